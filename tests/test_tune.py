"""CacheTune: offline scores, the stored order, sparse loads of the reused rows, and the ratio from measured costs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import TEST_DEVICE

from kvcake.reuse import TuneProfile, selective, token_scores
from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, GenerateResult
from kvcake.model import SamplingParams

DOCUMENTS = [
    "The lighthouse keeper counted ships every evening and wrote their names in a blue book. " * 3,
    "A river runs past the old mill; in spring the water rises and covers the lowest steps. " * 4,
]
SYSTEM = "Answer briefly."
QUERY = "Which book did the keeper write in?"


def ask(engine: Engine, reuse: str, ratio: float | None = None) -> GenerateResult:
    request = GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM, reuse=reuse, ratio=ratio, sampling=SamplingParams(max_tokens=5))
    result = engine.generate(request)
    engine.flush()
    return result


@pytest.fixture()
def engine(tiny_folders: dict[str, Path], tmp_path: Path) -> Engine:
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url="memory://", cache_dir=str(tmp_path))
    engine = Engine(config)
    yield engine
    engine.close()


def test_highpass_scores_rank_a_token_that_stands_out_first() -> None:
    keys = [torch.ones(2, 64, 4) + 0.01 * torch.randn(2, 64, 4, generator=torch.Generator().manual_seed(0))]
    values = [torch.ones(2, 64, 4)]
    keys[0][:, 37] += 5.0
    assert int(token_scores(keys, values, "highpass").argmax()) == 37
    assert token_scores(keys, values, "norm").shape == (64,)
    with pytest.raises(ValueError, match="unknown scoring rule"):
        token_scores(keys, values, "loud")


def test_ratio_one_recomputes_everything_and_equals_the_full_prefill(engine: Engine) -> None:
    full = ask(engine, "compute")
    tuned = ask(engine, "tune", 1.0)
    assert tuned.token_ids == full.token_ids
    assert (tuned.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    assert tuned.metrics.documents.mode == "tune" and tuned.metrics.documents.tokens_reused == 0


def test_only_the_reused_rows_are_read(engine: Engine) -> None:
    """Per request the store reads the reused rows' bytes and the small order entries, nothing else (headers are cached)."""
    first = ask(engine, "tune", 0.25)
    assert first.metrics.documents.documents_computed == 2
    assert ask(engine, "tune", 0.25).token_ids == first.token_ids
    planned = engine.plan_prompt(GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM))
    order_keys = [engine.strategies["tune"].document_key(engine.config.tenant, planned.preamble, planned.documents()[i], "scored-highpass-order") for i in range(2)]
    order_bytes = sum(engine.store.get(key).nbytes for key in order_keys)  # the memory tier reads tensor bytes, no header
    before = engine.store.stats()
    again = ask(engine, "tune", 0.25)
    read = engine.store.stats().bytes_read - before.bytes_read
    blend = again.metrics.documents
    assert blend.documents_stored == 2 and again.token_ids == first.token_ids
    lengths = [end - start for start, end in planned.document_spans]
    page = engine.store.page_tokens
    recomputed = [min(n, math.ceil(math.ceil(0.25 * n) / page) * page) for n in lengths]
    assert all(0.25 * n <= r < 0.25 * n + page for n, r in zip(lengths, recomputed))
    config = engine.model.config
    row_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4
    reused_rows = sum(n - r for n, r in zip(lengths, recomputed))
    assert blend.tokens_reused == reused_rows and blend.tokens_recomputed == sum(recomputed)
    assert blend.tokens_per_document == lengths and blend.recomputed_per_document == recomputed
    assert blend.bytes_loaded == reused_rows * row_bytes
    assert read == blend.bytes_loaded + order_bytes + again.metrics.prefix.bytes_loaded  # prefix: the preamble's tail blocks


def test_the_offset_correction_recomputes_its_sample_and_shifts_the_reused_rows(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """With blend_correction=offset, tune also computes each document's even sample of its reused rows (read as
    before), shifts the other reused rows by the sample's gap, and stays exact at ratio 1."""
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url="memory://", cache_dir=str(tmp_path))
    plain, corrected = Engine(config), Engine(config.replace(blend_correction="offset"))
    for engine in (plain, corrected):  # computes and stores the documents
        ask(engine, "tune", 0.25)
    uncorrected, shifted = ask(plain, "tune", 0.25), ask(corrected, "tune", 0.25)
    before, after = uncorrected.metrics.documents, shifted.metrics.documents
    planned = corrected.plan_prompt(GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM))
    page = corrected.store.page_tokens
    lengths = [end - start for start, end in planned.document_spans]
    reused = [n - min(n, math.ceil(math.ceil(0.25 * n) / page) * page) for n in lengths]
    assert sum(reused) == before.tokens_reused
    document_of = torch.cat([torch.full((n,), i) for i, n in enumerate(reused)])
    sample = int(selective._offset_sample(document_of).sum())
    assert sample > 0 and after.bytes_loaded == before.bytes_loaded
    assert after.tokens_recomputed == before.tokens_recomputed + sample and after.tokens_reused == before.tokens_reused - sample
    assert sum(after.recomputed_per_document) == after.tokens_recomputed and after.tokens_per_document == lengths
    assert (shifted.first_token_logits - uncorrected.first_token_logits).abs().max().item() > 1e-4, "the correction changed the answer's logits"
    full, tuned = ask(corrected, "compute"), ask(corrected, "tune", 1.0)
    assert tuned.token_ids == full.token_ids
    assert (tuned.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    plain.close()
    corrected.close()


def test_auto_ratio_follows_the_measured_costs() -> None:
    profile = TuneProfile()
    assert profile.ratio(0.15) == 0.15
    profile.record(compute_s=1.0, computed_tokens=1000, io_s=0.1, loaded_tokens=1000)
    assert profile.ratio(0.15) == 0.15
    slow_store = TuneProfile()
    slow_store.record(compute_s=1.0, computed_tokens=1000, io_s=3.0, loaded_tokens=1000)
    assert slow_store.ratio(0.15) == pytest.approx(0.75)
    busy = TuneProfile()
    busy.record(compute_s=9.0, computed_tokens=1000, io_s=3.0, loaded_tokens=1000)
    assert busy.ratio(0.15) == pytest.approx(0.25)
    assert busy.ratio(0.15) < slow_store.ratio(0.15)


def test_auto_ratio_is_reported_per_request(engine: Engine) -> None:
    first = ask(engine, "tune")
    assert first.metrics.documents.ratio == engine.config.tune_min_ratio
    assert engine.strategies["tune"].profile.compute_s_per_token is not None and engine.strategies["tune"].profile.io_s_per_token is not None
    expected = engine.strategies["tune"].ratio()
    assert ask(engine, "tune").metrics.documents.ratio == expected >= engine.config.tune_min_ratio


def test_warm_stores_the_scored_layout_for_tune(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", store_url="memory://", cache_dir=str(tmp_path), reuse="tune")
    engine = Engine(config)
    assert [present for _, _, present in engine.warm(DOCUMENTS, system=SYSTEM)] == [False, False]
    assert [present for _, _, present in engine.warm(DOCUMENTS, system=SYSTEM)] == [True, True]
    result = ask(engine, "tune", 0.5)
    assert result.metrics.documents.documents_stored == 2 and result.metrics.documents.tokens_reused > 0
    engine.close()


def _entry_file(store_dir: Path, key: str) -> Path:
    return store_dir / key[:2] / f"{key}.kv"


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "missing order", "missing entry"])
def test_a_damaged_or_missing_entry_is_computed_instead(tiny_folders: dict[str, Path], tmp_path: Path, damage: str) -> None:
    """Tune never fails on what it reads: a corrupt entry, another document's bytes under this one's key, or a
    lost entry give the full prefill's answer (computed), and a damaged read is named in the fallback."""
    store_dir = tmp_path / "kv"
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="float32", chunk_size=32,
                          store_url=f"file://{store_dir}", cache_dir=str(tmp_path))
    engine = Engine(config)
    full = ask(engine, "compute")
    keys = [key for key, _, _ in engine.warm(DOCUMENTS, system=SYSTEM, reuse="tune")]
    planned = engine.plan_prompt(GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM))
    tune = engine.strategies["tune"]
    order_keys = [tune.document_key(config.tenant, planned.preamble, ids, f"{tune.layout}-order") for ids in planned.documents()]
    first, second = _entry_file(store_dir, keys[0]), _entry_file(store_dir, keys[1])
    if damage == "corrupt":
        data = bytearray(first.read_bytes())
        data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
        first.write_bytes(bytes(data))
    elif damage == "foreign":
        first.write_bytes(second.read_bytes())
    elif damage == "missing order":
        _entry_file(store_dir, order_keys[0]).unlink()
    else:
        first.unlink()
    result = ask(engine, "tune", 0.5)
    if damage in ("corrupt", "foreign"):
        assert result.token_ids == full.token_ids
        assert (result.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
        assert "could not be read" in result.metrics.documents.fallback
    else:  # as if the first document had never been stored: it is computed, the second is reused, and both are stored again
        control = Engine(config.replace(store_url="memory://"))
        control.warm(DOCUMENTS[1:], system=SYSTEM, reuse="tune")
        expected = ask(control, "tune", 0.5)
        control.close()
        assert result.metrics.documents.documents_computed == 1 and not result.metrics.documents.fallback
        assert result.token_ids == expected.token_ids
        assert (result.first_token_logits - expected.first_token_logits).abs().max().item() <= 1e-5
        assert engine.store.contains(keys[0]) and engine.store.contains(order_keys[0])
    engine.close()

