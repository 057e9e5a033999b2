"""Prefix reuse by compute, load, Cake and split:m gives exactly the full prefill's result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TEST_DEVICE

from kvcake.config import KvcakeConfig
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, GenerateResult, RequestMetrics
from kvcake.model import SamplingParams, transformer
from kvcake.store import TAIL_BLOCK, ChunkKV, codec, open_store
from kvcake.store.buffers import BufferPool
from kvcake.store.bytestore import ByteStore
from kvcake.store.disk import FileBackend

CHUNK = 256
METHODS = ["load", "cake", "split:1", "split:3"]


def ask(engine: Engine, prompt: list[int], reuse: str, max_tokens: int = 8) -> GenerateResult:
    result = engine.generate(GenerateRequest(token_ids=prompt, reuse=reuse, sampling=SamplingParams(max_tokens=max_tokens)))
    engine.flush()
    return result


def assert_same(result: GenerateResult, reference: GenerateResult) -> None:
    assert result.token_ids == reference.token_ids
    assert (result.first_token_logits - reference.first_token_logits).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def prompt(default_config, default_tokenizer) -> list[int]:
    return default_tokenizer.encode(long_text(default_config.cache_path(), 12000))[: 5 * CHUNK + 40]


@pytest.fixture()
def engine(default_config: KvcakeConfig, tmp_path: Path) -> Engine:
    engine = Engine(default_config.replace(store_url=f"file://{tmp_path}/kv"))
    yield engine
    engine.close()


@pytest.mark.real_model
def test_every_strategy_equals_full_compute_on_many_chunks(engine: Engine, prompt: list[int]) -> None:
    reference = ask(engine, prompt, "compute")
    assert reference.metrics.prefix.hit_chunks == 0
    assert engine.store.stats().puts == 5 + 40 // TAIL_BLOCK  # the chunks, then the tail's full blocks
    again = ask(engine, prompt, "compute")
    assert_same(again, reference)
    assert again.metrics.prefix.hit_chunks == 5 and again.metrics.tokens_loaded == 0
    for method in METHODS:
        result = ask(engine, prompt, method)
        assert_same(result, reference)
        report = result.metrics.prefix
        assert report.hit_chunks == 5
        assert report.chunks_computed + report.chunks_loaded == 5
        assert report.tail_tokens_loaded == 40 // TAIL_BLOCK * TAIL_BLOCK
        assert result.metrics.tokens_computed == len(prompt) - report.tokens_loaded
    assert ask(engine, prompt, "load").metrics.prefix.chunks_loaded == 5
    split = ask(engine, prompt, "split:3").metrics.prefix
    assert (split.chunks_computed, split.chunks_loaded, split.meet_chunk) == (3, 2, 3)


@pytest.mark.real_model
def test_one_chunk_hit_and_a_hit_followed_by_new_tokens(engine: Engine, prompt: list[int]) -> None:
    short = prompt[: CHUNK + 5]
    ask(engine, short, "compute")
    for method in ("load", "cake"):
        result = ask(engine, short, method)
        assert result.metrics.prefix.hit_chunks == 1
        assert_same(result, ask(engine, short, "compute"))

    longer = prompt[: 2 * CHUNK] + prompt[3 * CHUNK : 3 * CHUNK + 30]
    reference = ask(engine, longer, "compute")
    for method in ("load", "cake"):
        result = ask(engine, longer, method)
        assert result.metrics.prefix.hit_chunks == 2
        assert_same(result, reference)


@pytest.mark.real_model
def test_a_fresh_engines_first_cake_hit_loads_what_the_store_delivers_sooner(engine: Engine, prompt: list[int], default_config: KvcakeConfig) -> None:
    """After a restart no read has been timed: the compute side gives the first read a chunk's compute time
    (timed at start) instead of computing chunk 0, which a file in the page cache delivers ~50x sooner."""
    reference = ask(engine, prompt, "compute")
    with Engine(default_config.replace(store_url=engine.config.store_url)) as restarted:
        result = ask(restarted, prompt, "cake")
    assert_same(result, reference)
    assert (result.metrics.prefix.chunks_computed, result.metrics.prefix.chunks_loaded) == (0, 5)


@pytest.mark.real_model
def test_corrupt_or_missing_chunk_in_the_middle_stays_exact(engine: Engine, prompt: list[int], tmp_path: Path) -> None:
    reference = ask(engine, prompt, "compute")
    entries = sorted((tmp_path / "kv").rglob("*.kv"), key=lambda p: p.stat().st_mtime_ns)
    assert len(entries) == 5 + 40 // TAIL_BLOCK
    keys = entries[:5]  # written head first: the chunks, then the tail's blocks
    data = bytearray(keys[3].read_bytes())
    data[len(data) // 2] ^= 0xFF
    keys[3].write_bytes(bytes(data))
    for method in ("load", "cake"):
        result = ask(engine, prompt, method)
        assert_same(result, reference)
    assert engine.store.stats().errors

    keys[2].unlink()
    result = ask(engine, prompt, "cake")
    assert_same(result, reference)


def test_every_strategy_stays_exact_with_a_slow_store(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """Loads throttled to roughly the compute speed, so Cake splits the prefix between its two sides."""
    store = open_store("memory://?max_gb=1&throttle_gbps=0.02&latency_ms=5")
    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, cache_dir=str(tmp_path))
    engine = Engine(config, store=store)
    prompt = torch.randint(3, 512, (32 * 24 + 7,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = ask(engine, prompt, "compute")
    for method in ("cake", "load", "split:12"):
        result = ask(engine, prompt, method)
        assert_same(result, reference)
    cake = ask(engine, prompt, "cake").metrics.prefix
    assert cake.chunks_computed + cake.chunks_loaded == 24
    assert cake.meet_chunk == cake.chunks_computed
    assert 0 < cake.chunks_computed < 24, "both sides took part: a 24-chunk load takes ~10x the compute here"
    engine.close()


def test_a_whole_context_of_read_buffers_is_mapped_up_front_and_then_read_into(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """What `kvcake serve` does at start-up (`Engine.map_read_buffers`): a restarted engine's first load reads into
    buffers mapped before it, and stays exact."""
    pool = BufferPool(max_free_bytes=1 << 30)
    store = ByteStore(FileBackend(tmp_path / "kv", None, pool=pool), pool=pool)
    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", cache_dir=str(tmp_path))
    prompt = torch.randint(3, 512, (CHUNK * 3 + 7,), generator=torch.Generator().manual_seed(0)).tolist()
    writer = Engine(config, store=store)
    reference = ask(writer, prompt, "compute")
    writer.close()
    pool = BufferPool(max_free_bytes=1 << 30)
    engine = Engine(config, store=ByteStore(FileBackend(tmp_path / "kv", None, pool=pool), pool=pool))
    model = engine.model.config
    entry = codec.entry_bytes(model.num_layers, model.num_kv_heads, CHUNK, model.head_dim, engine.model.dtype)
    assert engine.map_read_buffers() == engine.context_length // CHUNK * entry
    result = ask(engine, prompt, "load")
    assert_same(result, reference)
    assert result.metrics.prefix.chunks_loaded == 3
    assert pool.free_bytes == engine.context_length // CHUNK * entry, "the loads' buffers were mapped ones, back in the pool"
    engine.close()


def test_unknown_strategy_is_a_clear_error(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", store_url="memory://", cache_dir=str(tmp_path))
    engine = Engine(config)
    with pytest.raises(ValueError, match="unknown reuse strategy 'fast'"):
        engine.generate(GenerateRequest(token_ids=[5, 6], reuse="fast"))
    engine.close()


def test_store_that_is_down_never_fails_a_request(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """Nothing listens on port 1: every store call fails; the request computes and the stats say so."""
    url = "redis://127.0.0.1:1/0?timeout_s=0.2&connect_timeout_s=0.2"
    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url=url, cache_dir=str(tmp_path))
    engine = Engine(config)
    prompt = torch.randint(3, 512, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    first, second = ask(engine, prompt, "cake"), ask(engine, prompt, "cake")
    assert first.token_ids == second.token_ids
    assert second.metrics.prefix.hit_chunks == 0 and second.metrics.tokens_computed == len(prompt)
    assert sum(engine.store.stats().errors.values()) > 0
    engine.close()


def test_prefix_prefetched_while_waiting_stays_exact(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """A waiting request's stored chunks loaded ahead (from the back) are used as loaded; the budget bounds them."""
    from kvcake.model import SamplingParams

    config = KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url="memory://", cache_dir=str(tmp_path))
    engine = Engine(config)
    prompt = torch.randint(3, 512, (32 * 10 + 5,), generator=torch.Generator().manual_seed(2)).tolist()
    reference = ask(engine, prompt, "compute")
    request = GenerateRequest(token_ids=prompt, reuse="cake", sampling=SamplingParams(max_tokens=8))
    prefetch = engine.prefetch_prefix(request)
    prefetch.run()
    assert engine.prefix.prefetch_budget.used_bytes == prefetch.held_bytes > 0
    metrics = RequestMetrics()
    steps = list(engine.stream(request, metrics, prefetch))
    prefetch.release()
    assert [s.token_id for s in steps] == reference.token_ids
    assert (steps[0].logits - reference.first_token_logits).abs().max().item() <= 1e-5
    assert metrics.prefix.chunks_prefetched == 10 and metrics.prefix.chunks_loaded == 10
    assert engine.prefix.prefetch_budget.used_bytes == 0

    held = engine.prefix.prefetch_budget.limit_bytes
    engine.prefix.prefetch_budget.limit_bytes = 3 * (held and _chunk_bytes(engine, prompt))
    small = engine.prefetch_prefix(request)
    small.run()
    metrics = RequestMetrics()
    steps = list(engine.stream(request, metrics, small))
    small.release()
    assert [s.token_id for s in steps] == reference.token_ids
    assert metrics.prefix.chunks_prefetched == 3
    engine.close()


def _chunk_bytes(engine: Engine, prompt: list[int]) -> int:
    from kvcake.store import prefix_chunk_keys

    key = prefix_chunk_keys(engine.fingerprint, "", prompt, engine.config.chunk_size)[0]
    return engine.store.get(key).nbytes


@pytest.mark.parametrize(("writer_pass", "reader_pass"), [(96, 32), (32, 96), (64, 64)])
def test_prefill_passes_larger_than_a_chunk_keep_entries_and_exactness(tiny_folders: dict[str, Path], tmp_path: Path, writer_pass: int, reader_pass: int) -> None:
    """Entries stay chunk_size whatever the prefill's pass: one engine writes with one pass, another reads with another."""
    store = open_store("memory://")
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, cache_dir=str(tmp_path))
    writer = Engine(config.replace(compute_chunk=writer_pass), store=store)
    reader = Engine(config.replace(compute_chunk=reader_pass), store=store)
    prompt = torch.randint(3, 512, (32 * 7 + 5,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = ask(Engine(config, store=open_store("memory://")), prompt, "compute")
    written = ask(writer, prompt, "compute")
    assert_same(written, reference)
    assert store.stats().puts == 7
    for method in ("load", "cake", "split:3", "compute"):
        result = ask(reader, prompt, method)
        assert_same(result, reference)
        assert result.metrics.prefix.stored_chunks == 7
    writer.close()
    reader.close()


def test_a_pass_that_is_no_multiple_of_the_chunk_is_refused(tiny_folders: dict[str, Path]) -> None:
    from kvcake.config import ConfigError

    with pytest.raises(ConfigError, match="compute_chunk"):
        KvcakeConfig(model=str(tiny_folders["llama"]), chunk_size=32, compute_chunk=48)


@pytest.mark.parametrize("method", ["load", "cake", "split:1"])
def test_a_new_question_on_a_stored_document_loads_the_shared_tail_blocks(tiny_folders: dict[str, Path], tmp_path: Path, method: str) -> None:
    """The tokens after the last full chunk are stored in blocks: a prompt that shares the chunks and part of the
    tail (the document's end) loads the shared blocks and computes only the rest, with the full prefill's result;
    a short chat's next turn reuses the last one's blocks with no full chunk at all; a block of another shape is computed."""
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="float32", chunk_size=64, cache_dir=str(tmp_path))
    engine = Engine(config, store=open_store("memory://"))
    fresh = Engine(config, store=open_store("memory://"))
    ids = torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    document, first_question, second_question = ids[: 2 * 64 + 2 * TAIL_BLOCK + 5], ids[300:310], ids[350:362]
    ask(engine, document + first_question, "compute")
    prompt = document + second_question
    result = ask(engine, prompt, method)
    assert_same(result, ask(fresh, prompt, "compute"))
    assert result.metrics.prefix.hit_chunks == 2
    assert result.metrics.prefix.tail_tokens_loaded == 2 * TAIL_BLOCK
    assert result.metrics.tokens_loaded == result.metrics.prefix.chunks_loaded * 64 + 2 * TAIL_BLOCK

    turn = ids[:20]
    ask(engine, turn, "compute")
    next_turn = turn + ids[200:210]
    result = ask(engine, next_turn, method)
    assert_same(result, ask(fresh, next_turn, "compute"))
    assert (result.metrics.prefix.hit_chunks, result.metrics.prefix.tail_tokens_loaded) == (0, TAIL_BLOCK)

    block_key = engine.prefix.keys.prefix_tail("", prompt, engine.prefix.keys.prefix_chunks("", prompt))[1]
    block = engine.store.get(block_key)
    engine.store.put(block_key, ChunkKV(block.keys[:1], block.values[:1]))  # bytes of another shape under the key
    result = ask(engine, prompt, method)
    assert_same(result, ask(fresh, prompt, "compute"))
    assert result.metrics.prefix.tail_tokens_loaded == TAIL_BLOCK
    engine.close()
    fresh.close()


@pytest.mark.skipif(not transformer._ONEDNN_BF16, reason="the CPU has no bf16 instructions: SDPA's kernel runs instead")
@pytest.mark.parametrize("method", ["load", "cake", "split:2"])
def test_bf16_prefix_reuse_gives_the_full_prefill_s_bits(tiny_folders: dict[str, Path], tmp_path: Path, method: str) -> None:
    """In bf16 on a CPU with bf16 instructions, stored chunks and tail blocks across a 256-token grid line, then the
    new question's pass starting mid-cell, give the same logits to the bit as a full prefill in a fresh engine."""
    config = KvcakeConfig(model=str(tiny_folders["qwen2"]), device=TEST_DEVICE, dtype="bfloat16", chunk_size=64, cache_dir=str(tmp_path))
    engine = Engine(config, store=open_store("memory://"))
    fresh = Engine(config, store=open_store("memory://"))
    ids = torch.randint(3, 512, (500,), generator=torch.Generator().manual_seed(6)).tolist()
    document = ids[: 5 * 64 + 2 * TAIL_BLOCK + 3]
    ask(engine, document + ids[400:410], "compute")
    prompt = document + ids[450:463]
    result, reference = ask(engine, prompt, method), ask(fresh, prompt, "compute")
    assert result.metrics.prefix.hit_chunks == 5
    assert result.token_ids == reference.token_ids
    assert torch.equal(result.first_token_logits, reference.first_token_logits)
    engine.close()
    fresh.close()


@pytest.mark.parametrize(("shares_cores", "loader_cpu_s", "compute_waits"), [(True, 0.01, True), (True, 0.0, False), (False, 0.01, False)])
def test_a_loader_busy_on_the_cpu_takes_turns_with_the_compute_side(shares_cores: bool, loader_cpu_s: float, compute_waits: bool) -> None:
    """200 chunks, 1 s to compute one, 10 ms to read one: overlapped, the loader needs 2 s, so computing chunk 0
    beside it looks free. When the reads spend their time on the CPU the compute side runs on, the sides take
    turns instead, and the compute side leaves every chunk to the faster loader; reads that wait on a link do not."""
    from kvcake.reuse.cake import CostProfile, _Meeting

    profile = CostProfile()
    profile.record_compute(0, 1.0)
    meeting = _Meeting(200, 200, 0, profile, shares_cores=shares_cores)
    meeting.loaded(0.01, loader_cpu_s)
    assert (meeting._loader_finishes_first_by() is not None) == compute_waits
