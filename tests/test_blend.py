"""Blended document reuse: r = 1 is the full prefill, r = 0 is the stored caches concatenated, one entry serves any position."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import FAMILY_CONFIGS, TEST_DEVICE

from kvcake.reuse import LayerPrefetcher, selective
from kvcake.chunk import ChunkKV
from kvcake.cli import main
from kvcake.config import ConfigError, KvcakeConfig
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, GenerateResult, RequestError
from kvcake.model import SamplingParams
from kvcake.model.segments import document_preamble, document_token_ids
from kvcake.store import TAIL_BLOCK

SYSTEM = "You answer questions about the documents."
DOCUMENTS = [
    "The lighthouse keeper counted ships every evening and wrote their names in a blue book. " * 3,
    "A river runs past the old mill; in spring the water rises and covers the lowest steps. " * 4,
    "Bread was baked before dawn, and the smell reached the harbour by the time the boats left. " * 2,
]
QUERY = "Which book did the keeper write in?"


def tiny_engine(folder: Path, tmp_path: Path, **settings: object) -> Engine:
    config = KvcakeConfig(model=str(folder), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url="memory://", cache_dir=str(tmp_path))
    return Engine(config.replace(**settings))


def ask(engine: Engine, documents: list[str], reuse: str, ratio: float | None = None, system: str = SYSTEM) -> GenerateResult:
    request = GenerateRequest(query=QUERY, documents=documents, system=system, reuse=reuse, ratio=ratio, sampling=SamplingParams(max_tokens=6))
    result = engine.generate(request)
    engine.flush()
    return result


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def engine(request: pytest.FixtureRequest, tiny_folders: dict[str, Path], tmp_path: Path) -> Engine:
    engine = tiny_engine(tiny_folders[request.param], tmp_path)
    yield engine
    engine.close()


def test_ratio_one_equals_full_prefill(engine: Engine) -> None:
    full = ask(engine, DOCUMENTS, "compute")
    blended = ask(engine, DOCUMENTS, "blend", 1.0)
    assert blended.token_ids == full.token_ids
    assert (blended.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    assert blended.metrics.documents.tokens_recomputed == blended.metrics.documents.document_tokens
    assert blended.metrics.documents.tokens_reused == 0 and blended.metrics.documents.bytes_loaded == 0


def test_attention_in_row_blocks_gives_the_same_result(tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny_engine(tiny_folders["qwen2"], tmp_path)
    full, partial = ask(engine, DOCUMENTS, "blend", 1.0), ask(engine, DOCUMENTS, "blend", 0.25)
    monkeypatch.setattr(selective, "ATTENTION_BLOCK", 7)
    for reference, ratio in ((full, 1.0), (partial, 0.25)):
        blocked = ask(engine, DOCUMENTS, "blend", ratio)
        assert blocked.token_ids == reference.token_ids
        assert (blocked.first_token_logits - reference.first_token_logits).abs().max().item() <= 1e-5
    engine.close()


def test_ratio_zero_equals_concatenated_stored_caches(engine: Engine) -> None:
    engine.warm(DOCUMENTS, system=SYSTEM)
    naive = ask(engine, DOCUMENTS, "blend", 0.0)
    assert naive.metrics.documents.documents_stored == 3 and naive.metrics.documents.tokens_recomputed == 0

    planned = engine.plan_prompt(GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM))
    model = engine.model
    cache = model.new_cache(len(planned.token_ids))
    with torch.inference_mode():
        model.prefill(planned.token_ids[: planned.prefix_length], cache, engine.config.chunk_size)
        for index, (start, end) in enumerate(planned.document_spans):
            stored = engine.store.get(engine.strategies["blend"].document_key(engine.config.tenant, planned.preamble, planned.documents()[index]))
            positions = torch.arange(start, end)
            cos, sin = model.rope_tables(positions)  # a document's K is stored before RoPE
            model.load_kv(cache, ChunkKV([model.apply_rope(k, cos, sin) for k in stored.keys], stored.values), positions)
        query_start = planned.document_spans[-1][1]
        query = torch.tensor(planned.token_ids[query_start:])
        reference = model.forward(query, torch.arange(query_start, len(planned.token_ids)), cache).logits[-1]
    assert (naive.first_token_logits - reference).abs().max().item() <= 1e-5
    assert naive.token_ids[0] == int(reference.argmax())


def test_partial_ratio_recomputes_the_top_fraction(engine: Engine) -> None:
    result = ask(engine, DOCUMENTS, "blend", 0.25)
    blend = result.metrics.documents
    assert blend.documents_computed == 3 and blend.documents_stored == 0
    assert blend.tokens_recomputed == math.ceil(0.25 * blend.document_tokens) == blend.kept_per_check[0]
    assert blend.tokens_reused == blend.document_tokens - blend.tokens_recomputed
    assert len(blend.tokens_per_document) == 3 and sum(blend.tokens_per_document) == blend.document_tokens
    assert sum(blend.recomputed_per_document) == blend.tokens_recomputed
    assert all(0 <= r <= t for r, t in zip(blend.recomputed_per_document, blend.tokens_per_document))
    assert result.metrics.tokens_loaded == 0, "documents computed in this request are not loaded"
    again = ask(engine, DOCUMENTS, "blend", 0.25)
    assert again.metrics.documents.documents_stored == 3
    assert again.metrics.tokens_loaded - again.metrics.prefix.tokens_loaded == again.metrics.documents.tokens_reused == blend.tokens_reused
    assert again.token_ids == result.token_ids
    assert (again.first_token_logits - result.first_token_logits).abs().max().item() <= 1e-5


def test_a_document_at_two_positions_is_read_from_one_entry(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_folders["llama"], tmp_path, chunk_size=128)  # the prefix is no full chunk: it reads tail blocks only
    loaded_layers = engine.model.config.num_layers - engine.strategies["blend"].settings.check_layers[0]
    [(key, tokens, present), _] = engine.warm([DOCUMENTS[0], DOCUMENTS[1]], system=SYSTEM)
    preamble = document_preamble(engine.tokenizer, chat=True, system=SYSTEM)
    assert not present and key == engine.strategies["blend"].document_key(engine.config.tenant, preamble, document_token_ids(engine.tokenizer, DOCUMENTS[0]))
    spans, bytes_read = [], []
    for documents in ([DOCUMENTS[1], DOCUMENTS[0]], [DOCUMENTS[0]]):
        before = engine.store.stats()
        result = ask(engine, documents, "blend", 0.2)
        after = engine.store.stats()
        spans.append(engine.plan_prompt(GenerateRequest(query=QUERY, documents=documents, system=SYSTEM)).document_spans[-1])
        assert result.metrics.documents.documents_stored == len(documents)
        tail_blocks = result.metrics.prefix.tail_tokens_loaded // TAIL_BLOCK
        assert after.hits - before.hits == len(documents) * loaded_layers + tail_blocks
        assert after.misses == before.misses
        bytes_read.append(after.bytes_read - before.bytes_read - result.metrics.prefix.bytes_loaded)
        assert bytes_read[-1] >= result.metrics.documents.bytes_loaded > 0
    assert tail_blocks, "the second request loads the preamble's tail blocks the first one stored"
    assert spans[0][0] != spans[1][0] and spans[0][1] - spans[0][0] == spans[1][1] - spans[1][0] == tokens
    assert bytes_read[1] == result.metrics.documents.bytes_loaded, "the second read reuses the cached entry header"
    engine.close()


def test_documents_are_stored_per_system_text(engine: Engine) -> None:
    engine.warm(DOCUMENTS, system=SYSTEM)
    assert ask(engine, DOCUMENTS, "blend", 0.0).metrics.documents.documents_stored == 3
    assert ask(engine, DOCUMENTS, "blend", 0.0, system="Other instructions.").metrics.documents.documents_stored == 0


def test_gradual_filtering_keeps_fewer_tokens_at_each_check(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_folders["qwen2"], tmp_path, blend_check_layers="0,1,2")
    blend = ask(engine, DOCUMENTS, "blend", 0.1).metrics.documents
    assert blend.kept_per_check == sorted(blend.kept_per_check, reverse=True)
    assert blend.kept_per_check[-1] == blend.tokens_recomputed == math.ceil(0.1 * blend.document_tokens)
    engine.close()


def test_corrupt_document_entry_falls_back_to_computing(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_folders["llama"], tmp_path, store_url=f"file://{tmp_path}/kv")
    full = ask(engine, DOCUMENTS, "compute")
    engine.warm(DOCUMENTS, system=SYSTEM)
    for entry in (tmp_path / "kv").rglob("*"):
        if entry.is_file() and entry.stat().st_size > 4096:
            data = bytearray(entry.read_bytes())
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
            entry.write_bytes(bytes(data))
    result = ask(engine, DOCUMENTS, "blend", 0.15)
    assert "could not be read" in result.metrics.documents.fallback
    assert result.token_ids == full.token_ids
    assert (result.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    engine.close()


def test_a_foreign_document_entry_falls_back_to_computing(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """Another document's valid entry copied under this one's key is not used: the answer is the full prefill's."""
    engine = tiny_engine(tiny_folders["llama"], tmp_path, store_url=f"file://{tmp_path}/kv")
    full = ask(engine, DOCUMENTS, "compute")
    keys = [key for key, _, _ in engine.warm(DOCUMENTS, system=SYSTEM)]
    entry = lambda key: tmp_path / "kv" / key[:2] / f"{key}.kv"  # noqa: E731
    entry(keys[0]).write_bytes(entry(keys[1]).read_bytes())
    result = ask(engine, DOCUMENTS, "blend", 0.15)
    assert "could not be read" in result.metrics.documents.fallback
    assert result.token_ids == full.token_ids
    assert (result.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    assert engine.store.stats().errors.get("foreign_key", 0) >= 1
    engine.close()


def test_separator_cuts_a_plain_prompt_into_documents(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_folders["llama"], tmp_path, separator="<<DOC>>")
    from_prompt = engine.plan_prompt(GenerateRequest(prompt="<<DOC>>".join([*DOCUMENTS, QUERY])))
    from_fields = engine.plan_prompt(GenerateRequest(query=QUERY, documents=[d.strip() for d in DOCUMENTS]))
    assert from_prompt == from_fields and len(from_prompt.document_spans) == 3
    assert engine.tokenizer.decode(from_prompt.documents()[1]).strip() == DOCUMENTS[1].strip()
    engine.close()


def test_bad_blend_requests_name_the_cause(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_folders["llama"], tmp_path)
    with pytest.raises(RequestError, match="documents need a query"):
        engine.generate(GenerateRequest(prompt="hi", documents=["x"]))
    with pytest.raises(RequestError, match="ratio"):
        engine.generate(GenerateRequest(query="q", documents=["x"], reuse="blend", ratio=1.5))
    with pytest.raises(RequestError, match="unknown reuse strategy"):
        engine.generate(GenerateRequest(query="q", documents=["x"], reuse="bogus"))
    with pytest.raises(RequestError, match="query is empty"):
        engine.generate(GenerateRequest(query="  ", documents=["x"]))
    engine.close()
    with pytest.raises(ConfigError, match="blend_check_layers"):
        tiny_engine(tiny_folders["llama"], tmp_path, blend_check_layers="5")
    with pytest.raises(ConfigError, match="blend_ratio"):
        KvcakeConfig(blend_ratio=2.0)


def test_prefetcher_stops_at_a_failed_layer() -> None:
    calls: list[int] = []

    def source(layer: int) -> tuple[ChunkKV, int] | None:
        calls.append(layer)
        return None if layer == 3 else (ChunkKV([torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 4)]), 64)

    prefetcher = LayerPrefetcher(source, range(1, 8), ahead=2)
    assert [prefetcher.get(layer) is not None for layer in range(1, 8)] == [True, True, False, False, False, False, False]
    prefetcher.close()
    assert calls == [1, 2, 3] and prefetcher.bytes_loaded == 128


def test_warm_and_generate_from_the_command_line(tiny_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    document = tmp_path / "doc.txt"
    document.write_text(DOCUMENTS[1])
    settings = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--cache-dir", str(tmp_path), "--store-url", f"file://{tmp_path}/kv"]
    assert main(["warm", str(document), *settings]) == 0
    assert main(["warm", str(document), *settings]) == 0
    warm_lines = capsys.readouterr().out.splitlines()
    assert warm_lines[0].endswith(" stored") and warm_lines[1].endswith("already stored")
    assert main(["generate", "--query", QUERY, "--document", str(document), "--reuse", "blend", "--max-tokens", "3", *settings]) == 0
    assert "documents=1 (stored 1, computed 0)" in capsys.readouterr().err


@pytest.mark.real_model
def test_default_model_blend_matches_full_prefill_at_ratio_one(default_config: KvcakeConfig, tmp_path: Path) -> None:
    from kvcake.data import disfl_qa_questions

    engine = Engine(default_config.replace(store_url=f"file://{tmp_path}/kv"))
    questions = disfl_qa_questions(default_config.cache_path())
    passages = [q.passage for q in questions[:40:10]]
    question = questions[0]

    def answer(reuse: str, ratio: float | None = None) -> GenerateResult:
        request = GenerateRequest(query=question.question, documents=passages, system=SYSTEM, reuse=reuse, ratio=ratio)
        request.sampling = SamplingParams(max_tokens=8)
        result = engine.generate(request)
        engine.flush()
        return result

    full = answer("compute")
    exact = answer("blend", 1.0)
    assert exact.token_ids == full.token_ids
    # The engine's full prefill runs 256-token chunks, the blend 512-row attention blocks: fp32 sums differ in the last bits.
    assert (exact.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-4
    planned = engine.plan_prompt(GenerateRequest(query=question.question, documents=passages, system=SYSTEM))
    with torch.inference_mode():
        cache = engine.model.new_cache(len(planned.token_ids))
        engine.model.prefill(planned.token_ids[: planned.prefix_length], cache, engine.config.chunk_size)
        one_pass = engine.model.prefill(planned.token_ids[planned.prefix_length :], cache, len(planned.token_ids), planned.prefix_length)
    # Blend's attention runs in 512-row blocks, its matmuls over all rows at once, and oneDNN's packed kernels
    # accumulate by row block: only fp32 rounding differs (logits are ~10, measured up to 5.2e-5).
    assert (exact.first_token_logits - one_pass).abs().max().item() <= 1e-4, "the same partition as a full prefill"
    blended = answer("blend", 0.15)
    assert blended.metrics.documents.documents_computed == 4 and not blended.metrics.documents.fallback
    again = answer("blend", 0.15)
    assert again.metrics.documents.documents_stored == 4 and again.token_ids == blended.token_ids
    engine.close()


@pytest.mark.parametrize(("selection", "correction"), [("question", "none"), ("probe", "none"), ("deviation", "offset"), ("probe", "offset")])
def test_question_selection_and_offset_correction_keep_ratio_one_exact(tiny_folders: dict[str, Path], tmp_path: Path, selection: str, correction: str) -> None:
    engine = tiny_engine(tiny_folders["qwen2"], tmp_path, blend_selection=selection, blend_correction=correction)
    full = ask(engine, DOCUMENTS, "compute")
    blended = ask(engine, DOCUMENTS, "blend", 1.0)
    assert blended.token_ids == full.token_ids
    assert (blended.first_token_logits - full.first_token_logits).abs().max().item() <= 1e-5
    partial = ask(engine, DOCUMENTS, "blend", 0.25).metrics.documents
    assert partial.tokens_recomputed == math.ceil(0.25 * partial.document_tokens)
    assert 0 < partial.compute_share < 1 and blended.metrics.documents.compute_share == 1.0
    engine.close()


def test_question_attention_ranks_the_keys_the_question_points_at() -> None:
    """Hand-built: every head of the question's queries points at keys 3 and 5 (5 the most); key 7 lies after
    the question's position, so it gets nothing whatever it holds."""
    keys = torch.zeros(2, 8, 4)
    keys[:, 3, 0], keys[:, 5, 0], keys[:, 7, 0] = 4.0, 8.0, 50.0
    queries = torch.zeros(4, 2, 4)
    queries[..., 0] = 2.0
    weights = selective.question_attention(queries, keys, torch.tensor([5, 6]), torch.arange(8))
    assert weights.argsort(descending=True)[:2].tolist() == [5, 3]
    assert float(weights[7]) == 0.0 and abs(float(weights.sum()) - 1.0) < 1e-6


def test_offset_correction_moves_each_documents_reused_rows_by_its_recomputed_rows_mean_gap() -> None:
    """Hand-built: document 0's recomputed rows (0, 1) sit +1 and +3 (K) and -2 (V) from their stored K/V, so its
    reused row 2 moves by +2 and -2; document 1 has no recomputed row and stays as stored."""
    stored_keys, stored_values = torch.zeros(1, 5, 2), torch.ones(1, 5, 2)
    fresh_keys = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]])  # active tokens: stored rows 0, 1 and a query token
    fresh_values = torch.full((1, 3, 2), -1.0)
    rows = torch.tensor([0, 1, -1])
    document_of = torch.tensor([0, 0, 0, 1, 1])
    keys, values = selective._shifted(stored_keys, stored_values, fresh_keys, fresh_values, rows, document_of)
    assert keys[0, 2].tolist() == [2.0, 2.0] and values[0, 2].tolist() == [-1.0, -1.0]
    assert torch.equal(keys[:, 3:], stored_keys[:, 3:]) and torch.equal(values[:, 3:], stored_values[:, 3:])


def test_the_offset_sample_is_every_stride_th_token_of_each_document() -> None:
    stride = selective.OFFSET_STRIDE
    document_of = torch.tensor([0] * (2 * stride + 1) + [1] * stride)
    first = stride // 2
    expected = [first, first + stride, 2 * stride + 1 + first]
    assert selective._offset_sample(document_of).nonzero().squeeze(1).tolist() == expected


def test_a_stored_layer_whose_rows_do_not_match_the_stored_tokens_falls_back() -> None:
    """The layer reader and the blend share one row order (`DocumentRows`); a layer with another number of rows is
    never blended into the wrong tokens."""
    prefetcher = LayerPrefetcher(lambda layer: (ChunkKV([torch.zeros(1, 3, 4)], [torch.zeros(1, 3, 4)]), 96), range(2))
    assert selective._checked(prefetcher, 0, 3).num_tokens == 3
    with pytest.raises(selective.BlendFallback, match="3 rows for 5 stored tokens"):
        selective._checked(prefetcher, 1, 5)
    prefetcher.close()


def test_probe_selects_before_the_first_layer_and_computes_no_layer_in_full(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """The probe's scores exist before the blend starts, so every layer computes only the selected document tokens and
    the rest of the prompt: the compute share is the probe's pass plus those rows, with no check layer in full."""
    engine = tiny_engine(tiny_folders["qwen2"], tmp_path, blend_selection="probe")
    ask(engine, DOCUMENTS, "blend", 0.25)  # computes and stores the documents
    report = ask(engine, DOCUMENTS, "blend", 0.25).metrics.documents
    planned = engine.plan_prompt(GenerateRequest(query=QUERY, documents=DOCUMENTS, system=SYSTEM))
    num_layers = engine.model.config.num_layers
    tokens = len(planned.token_ids) - planned.prefix_length
    others = tokens - report.document_tokens
    probe_layers = max(1, round(selective.PROBE_DEPTH * num_layers))
    assert report.check_layers == [] and report.kept_per_check == [report.tokens_recomputed]
    assert report.tokens_recomputed == math.ceil(0.25 * report.document_tokens)
    assert report.compute_share == pytest.approx((probe_layers * others + num_layers * (others + report.tokens_recomputed)) / (num_layers * tokens))
    engine.close()


def test_probe_blend_of_kv_stored_where_it_sits_equals_the_full_prefill(tiny_folders: dict[str, Path]) -> None:
    """Hand-built: the document opens the prompt, so its stored K/V (computed alone at the same positions) is what
    the full prefill computes. Whatever the probe selects, the tokens it leaves keep their stored K/V from layer 0
    on, so the blend's logits equal the full prefill's; a stored row written at the wrong place or unrotated would
    show."""
    from kvcake.model import Transformer

    model = Transformer.from_folder(tiny_folders["qwen2"], TEST_DEVICE, torch.float32)
    token_ids = torch.randint(3, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0))
    document, positions = torch.arange(36), torch.arange(48)
    with torch.inference_mode():
        alone = model.forward(token_ids[document], positions[document], model.new_cache(48), keep_kv=True).kv
        full = model.forward(token_ids, positions, model.new_cache(48)).logits[-1]
        prefetcher = LayerPrefetcher(lambda layer: (ChunkKV([alone.keys[layer]], [alone.values[layer]]), 0), range(model.config.num_layers))
        blend = selective.BlendPrefill(model, 0.25, [1], selection="probe").run(model.new_cache(48), token_ids, positions, document, prefetcher)
        while True:
            try:
                next(blend)
            except StopIteration as done:
                logits, report = done.value
                break
        prefetcher.close()
    assert report.check_layers == [] and report.tokens_recomputed == math.ceil(0.25 * 36)
    assert (logits - full).abs().max().item() <= 1e-4
