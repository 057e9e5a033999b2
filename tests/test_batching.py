"""Continuous batching: requests served together give the tokens (and logits) they give alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny import TEST_DEVICE

from kvcake.reuse.documents import packs
from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, RequestMetrics, Step, WarmRequest
from kvcake.model import SamplingParams, Transformer, transformer
from kvcake.model.kv import CachePool
from kvcake.reuse import ALONE, PACE, Alone, drain
from kvcake.server.worker import Cancelled, ComputeWorker, Done, Event, Failed, Job, PromptLogprobs, TokenEvent

FAMILIES = ["llama", "llama3-rope", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_of_a_batched_decode_step_equals_its_own_forward(tiny_folders: dict[str, Path], family: str) -> None:
    model = Transformer.from_folder(tiny_folders[family], TEST_DEVICE)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (length,), generator=generator) for length in (5, 17, 40)]
    caches = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = model.new_cache(64)
            model.forward(prompt, torch.arange(len(prompt)), cache)
            caches.append(cache)
        alone = [cache.fork() for cache in caches]
        tokens = torch.tensor([7, 300, 45])
        positions = torch.tensor([len(p) for p in prompts])
        batched = model.decode_batch(tokens, positions, caches)
        for row, cache in enumerate(alone):
            single = model.forward(tokens[row : row + 1], positions[row : row + 1], cache).logits[-1]
            assert (batched[row] - single).abs().max().item() <= 1e-4
            assert cache.length == caches[row].length
            for layer in range(model.config.num_layers):
                assert torch.allclose(cache.keys[layer][:, : cache.length], caches[row].keys[layer][:, : cache.length], atol=1e-5)


def test_half_precision_rows_of_different_lengths_batched_equal_their_own_forward(tiny_folders: dict[str, Path]) -> None:
    """bf16 rows attend as one padded batch on a CPU: the padding must not leak into any row."""
    model = Transformer.from_folder(tiny_folders["qwen2"], TEST_DEVICE, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 512, (length,), generator=generator) for length in (3, 29, 50, 11)]
    with torch.inference_mode():
        caches = []
        for prompt in prompts:
            caches.append(model.new_cache(64))
            model.forward(prompt, torch.arange(len(prompt)), caches[-1])
        alone = [cache.fork() for cache in caches]
        tokens, positions = torch.tensor([7, 300, 45, 2]), torch.tensor([len(p) for p in prompts])
        batched = model.decode_batch(tokens, positions, caches)
        for row, cache in enumerate(alone):
            single = model.forward(tokens[row : row + 1], positions[row : row + 1], cache).logits[-1]
            torch.testing.assert_close(batched[row], single, atol=3e-2, rtol=3e-2)
        shuffled = model.decode_batch(tokens[[2, 0, 3, 1]], positions[[2, 0, 3, 1]] + 1, [alone[i] for i in (2, 0, 3, 1)])
        again = model.decode_batch(tokens, positions + 1, caches)
        torch.testing.assert_close(shuffled, again[[2, 0, 3, 1]], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("headroom, kept_bytes", [(64, 256 << 20), (2, 256 << 20), (64, 0)], ids=["kept", "rebuilt", "refilled"])
def test_rows_decoding_step_after_step_equal_their_own_forward(
    tiny_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, headroom: int, kept_bytes: int, dtype: torch.dtype
) -> None:
    """The padded bf16 batch kept from step to step (new tokens as one column) gives each row its own forward's
    logits at every step, also when it runs out of room and is rebuilt, when it is too big to keep, and after a
    row leaves; a cache truncated and grown back to the same length is not mistaken for the kept one."""
    monkeypatch.setattr(transformer, "PADDED_ROWS_HEADROOM", headroom)
    monkeypatch.setattr(transformer, "PADDED_ROWS_BYTES", kept_bytes)
    model = Transformer.from_folder(tiny_folders["qwen2"], TEST_DEVICE, dtype=dtype)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    generator = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, 512, (length,), generator=generator) for length in (5, 40, 17)]
    with torch.inference_mode():
        caches, alone = [], []
        for prompt in prompts:
            caches.append(model.new_cache(128))
            model.forward(prompt, torch.arange(len(prompt)), caches[-1])
            alone.append(caches[-1].fork())
        positions = torch.tensor([len(p) for p in prompts])
        for step in range(6):
            rows = 3 if step < 4 else 2
            tokens = torch.randint(0, 512, (rows,), generator=generator)
            batched = model.decode_batch(tokens, positions[:rows] + step, caches[:rows])
            for row in range(rows):
                single = model.forward(tokens[row : row + 1], positions[row : row + 1] + step, alone[row]).logits[-1]
                torch.testing.assert_close(batched[row], single, atol=tolerance, rtol=tolerance)
        replaced = torch.randint(0, 512, (2,), generator=generator)
        for cache, copy in zip(caches[:2], alone[:2]):
            for kv_cache in (cache, copy):
                kv_cache.truncate(kv_cache.length - 1)
        last = positions[:2] + 5
        model.forward(replaced[:1], last[:1], caches[0])
        model.forward(replaced[1:], last[1:], caches[1])
        for copy, token, position in zip(alone[:2], replaced, last):
            model.forward(token[None], position[None], copy)
        tokens = torch.randint(0, 512, (2,), generator=generator)
        batched = model.decode_batch(tokens, last + 1, caches[:2])
        for row in range(2):
            single = model.forward(tokens[row : row + 1], last[row : row + 1] + 1, alone[row]).logits[-1]
            torch.testing.assert_close(batched[row], single, atol=tolerance, rtol=tolerance)


class _Collector:
    """A job's events, and an event set when it is done."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.done = threading.Event()
        self.outcome: tuple[str, object] | None = None

    def emit(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.step.token_id)
            self.logits.append(event.step.logits)
        elif not isinstance(event, PromptLogprobs):
            self.outcome = (_kind(event), event.result if isinstance(event, Done) else None)
            self.done.set()


def _kind(event: Event) -> str:
    return {TokenEvent: "token", PromptLogprobs: "prompt_logprobs", Done: "done", Failed: "error", Cancelled: "cancelled"}[type(event)]


def _serve_together(engine: Engine, requests: list[GenerateRequest], max_batch: int) -> tuple[list[_Collector], ComputeWorker]:
    worker = ComputeWorker(engine, max_queue=32, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=max_batch)
    collectors = [_Collector() for _ in requests]
    for request, collector in zip(requests, collectors):
        worker.submit(Job(request=request, planned=None, emit=collector.emit))
    for collector in collectors:
        assert collector.done.wait(120)
    worker.close()
    return collectors, worker


def _greedy(prompt: list[int], reuse: str = "compute", tokens: int = 12, **fields) -> GenerateRequest:
    return GenerateRequest(token_ids=prompt, reuse=reuse, sampling=SamplingParams(max_tokens=tokens, temperature=0.0), **fields)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_served_together_give_what_they_give_alone(tiny_folders: dict[str, Path], tmp_path: Path, family: str) -> None:
    config = KvcakeConfig(model=str(tiny_folders[family]), device=TEST_DEVICE, dtype="float32", chunk_size=32,
                          store_url="memory://", cache_dir=str(tmp_path))
    engine = Engine(config)
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (length,), generator=generator).tolist() for length in (9, 70, 130, 40)]
    engine.generate(_greedy(prompts[2]))  # stores its prefix chunks for the load and Cake requests below
    engine.flush()
    requests = [_greedy(prompts[0]), _greedy(prompts[1], tokens=20), _greedy(prompts[2], "load"), _greedy(prompts[2], "cake"),
                _greedy(prompts[3], n=2)]
    alone = []
    for request in requests:
        metrics = RequestMetrics()
        alone.append([(step.token_id, step.logits) for step in engine.stream(request, metrics)])
    together, worker = _serve_together(engine, requests, max_batch=4)
    for reference, served in zip(alone, together):
        assert served.outcome is not None and served.outcome[0] == "done"
        assert served.tokens == [token for token, _ in reference]
        for (_, expected), got in zip(reference, served.logits):
            assert (expected - got).abs().max().item() <= 1e-4
    assert worker.decode_rows > worker.decode_steps, "some decode steps ran several requests at once"
    full = [step.logits for step in engine.stream(_greedy(prompts[2]), RequestMetrics())]
    assert (together[2].logits[0] - full[0]).abs().max().item() <= 1e-5, "load inside a batch equals the full prefill"
    engine.close()


def test_a_blend_request_at_ratio_one_inside_a_batch_equals_the_full_prefill(config: KvcakeConfig) -> None:
    engine = Engine(config)
    documents = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France. " * 4]
    query = "Which city is named?"
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    blend = GenerateRequest(query=query, documents=documents, reuse="blend", ratio=1.0, sampling=sampling)
    full = GenerateRequest(query=query, documents=documents, reuse="compute", sampling=sampling)
    reference = [step.token_id for step in engine.stream(full, RequestMetrics())]
    engine.warm(documents)
    together, _ = _serve_together(engine, [blend, full, _greedy(list(range(3, 40)))], max_batch=3)
    assert together[0].tokens == reference == together[1].tokens
    engine.close()


def test_a_cancelled_request_leaves_the_others_running(config: KvcakeConfig) -> None:
    engine = Engine(config)
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=4)
    long_one, short_one = _Collector(), _Collector()
    long_job = Job(request=_greedy(list(range(3, 30)), tokens=4000), planned=None, emit=long_one.emit)
    worker.submit(long_job)
    worker.submit(Job(request=_greedy(list(range(5, 25)), tokens=10), planned=None, emit=short_one.emit))
    assert short_one.done.wait(60) and len(short_one.tokens) == 10
    long_job.cancelled.set()
    assert long_one.done.wait(60) and long_one.outcome[0] == "done" and len(long_one.tokens) < 4000
    worker.close()
    engine.close()


def _pauses_before_the_first_token(engine: Engine, request: GenerateRequest, pace: Alone | None = None) -> tuple[int, Step]:
    """How often `run` paused before its first token (each pause, and each `PACE` question, answered `pace`), and
    that token's step."""
    work = engine.run(request, RequestMetrics())
    pauses, reply = 0, None
    with torch.inference_mode():
        while True:
            item = work.send(reply)
            if item is None or item is PACE:
                pauses, reply = pauses + (item is None), pace
                continue
            work.close()
            return pauses, item


def test_a_prefill_told_it_runs_alone_takes_long_passes_with_the_same_bits(config: KvcakeConfig) -> None:
    """Answered `ALONE`, a prefill computes its prompt in one long pass; answered None, in passes of the configured
    size. A token's K/V and the first token's logits do not depend on the pass."""
    engines = [Engine(config.replace(chunk_size=16)) for _ in range(2)]  # each its own store: both prompts are cold
    prompt = torch.randint(3, 512, (16 * 12 + 7,), generator=torch.Generator().manual_seed(2)).tolist()
    short, in_short_passes = _pauses_before_the_first_token(engines[0], _greedy(prompt))
    long, in_long_passes = _pauses_before_the_first_token(engines[1], _greedy(prompt), ALONE)
    assert short == 13 and long == 1
    assert in_short_passes.token_id == in_long_passes.token_id
    assert torch.equal(in_short_passes.logits, in_long_passes.logits)
    for engine in engines:
        engine.close()


def test_a_long_prefill_beside_a_decoding_request_keeps_short_passes(config: KvcakeConfig) -> None:
    """A prefill that starts while another request decodes is not told it runs alone: that request's tokens keep
    coming between its short passes, all of them before the long prompt's first token; once nothing decodes, the long
    prefill's passes grow, and its tokens are what it gives served alone."""
    engine, reference = Engine(config.replace(chunk_size=16)), Engine(config.replace(chunk_size=16))
    long_prompt = torch.randint(3, 512, (16 * 30,), generator=torch.Generator().manual_seed(4)).tolist()
    solo = [step.token_id for step in reference.stream(_greedy(long_prompt, tokens=4), RequestMetrics())]
    reference.close()
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=2)
    order: list[str] = []
    decoding, long_one = _Collector(), _Collector()
    long_job = Job(request=_greedy(long_prompt, tokens=4), planned=None,
                   emit=lambda event: (order.append("long"), long_one.emit(event)))

    def on_decoded(event: Event) -> None:
        if isinstance(event, TokenEvent) and not decoding.tokens:
            worker.submit(long_job)  # joins while this request decodes
        order.append("decode")
        decoding.emit(event)

    worker.submit(Job(request=_greedy(list(range(3, 12)), tokens=20), planned=None, emit=on_decoded))
    assert decoding.done.wait(60) and long_one.done.wait(60)
    worker.close()
    assert len(decoding.tokens) == 20 and long_one.tokens == solo
    assert order.index("long") > len(order) - order[::-1].index("decode") - 1, "every decoded token came before the long prompt's first"
    engine.close()


@pytest.mark.parametrize("reuse", ["blend", "tune"])
def test_documents_missing_from_the_store_are_computed_pass_by_pass(config: KvcakeConfig, reuse: str) -> None:
    """A request whose documents must be computed first pauses after each pass of them too, so it batches."""
    documents = [f"Document {i} says the river bends {i} times near the old mill." for i in range(4)]
    request = GenerateRequest(query="How often does the river bend?", documents=documents, reuse=reuse, ratio=0.5, sampling=SamplingParams(max_tokens=2))
    cold, warmed = Engine(config.replace(chunk_size=16)), Engine(config.replace(chunk_size=16))
    warmed.warm(documents, reuse=reuse)
    computing, first = _pauses_before_the_first_token(cold, request)
    stored, again = _pauses_before_the_first_token(warmed, request)
    lengths = [len(ids) for ids in cold.plan_prompt(request).documents()]
    # a pack of short documents is one pass; a document longer than a pass is cut into passes
    passes = sum(-(-lengths[batch[0]] // 16) if len(batch) == 1 else 1 for batch in packs(lengths, 16))
    assert computing == stored + passes and passes > 1 and first.token_id == again.token_id
    cold.close()
    warmed.close()


def test_a_document_longer_than_a_pass_pauses_after_each_of_its_passes(config: KvcakeConfig) -> None:
    """A warm call of one long document is cut into prefill passes like any prompt, so it cannot stall the
    requests beside it; what it stores equals the document computed in one go."""
    engine = Engine(config.replace(chunk_size=16))
    document = " ".join(f"line {i} of the tide table." for i in range(60))
    preamble, [ids] = engine.planner.plan_documents([document], True, None)
    steps = engine.warm_steps(WarmRequest([document], reuse="blend"))
    pauses = 0
    with torch.inference_mode():
        try:
            while True:
                next(steps)
                pauses += 1
        except StopIteration as stop:
            [(key, tokens, present)] = stop.value
    passes = -(-len(ids) // 16)
    assert passes > 3 and pauses == passes and tokens == len(ids) and not present
    stored = engine.store.get(key)
    whole = Engine(config.replace(chunk_size=4096)).strategies["blend"].compute([ids], preamble)
    with torch.inference_mode():
        [one_go] = drain(whole)
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(stored.keys + stored.values, one_go.keys + one_go.values))
    engine.close()


ANSWER_BUDGET = 2000


@pytest.mark.parametrize("reuse, stop_after", [("blend", "a pause"), ("cake", "a token")])
def test_a_request_that_stops_early_gives_its_caches_back(config: KvcakeConfig, reuse: str, stop_after: str) -> None:
    """Closed mid-prefill (a blend) or mid-decode of its first of two choices, a request returns every cache to the pool."""
    engine = Engine(config)
    documents = ["The lighthouse keeper counts ships every night.", "Gulls nest on the northern cliffs."]
    request = GenerateRequest(query="What does the keeper count?", documents=documents, reuse=reuse, n=2, sampling=SamplingParams(max_tokens=ANSWER_BUDGET))
    work = engine.run(request, RequestMetrics())
    with torch.inference_mode():
        item = work.send(None)
        while stop_after == "a token" and (item is None or item is PACE):  # only prefill pauses come before the first token
            item = work.send(None)
    work.close()
    # the request's caches have a capacity (prompt + 2,000 tokens) that no document pass uses, so the
    # pool's buffers of that shape can only be the ones the request gave back
    sample = engine.model.new_cache(CachePool.rounded(len(engine.plan_prompt(request).token_ids) + ANSWER_BUDGET)).keys
    returned = 0
    while engine.cache_pool.take(len(sample), tuple(sample[0].shape), sample[0].device, sample[0].dtype) is not None:
        returned += 1
    assert returned == (2 if stop_after == "a token" else 1)
    engine.close()


def test_a_warm_call_runs_pass_by_pass_beside_a_decoding_request(config: KvcakeConfig) -> None:
    """A warm call is cut into passes like a prefill: a request decoding beside it finishes first, and the
    warm call still stores every document."""
    engine = Engine(config)
    documents = [f"Entry {i}: " + "the tide table lists high and low water for each day of the month. " * 3 for i in range(40)]
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=2)
    finished: list[str] = []
    decoding, warming = _Collector(), _Collector()
    worker.submit(Job(request=_greedy(list(range(3, 20)), tokens=10), planned=None, emit=lambda e: (decoding.emit(e), isinstance(e, Done) and finished.append("decode"))))
    worker.submit(Job(request=WarmRequest(documents), planned=None, emit=lambda e: (warming.emit(e), finished.append("warm"))))
    assert decoding.done.wait(120) and warming.done.wait(120)
    worker.close()
    assert finished == ["decode", "warm"] and len(decoding.tokens) == 10
    assert warming.outcome[0] == "done" and len(warming.outcome[1]) == len(documents)
    assert all(engine.store.contains(key) for key, _, _ in warming.outcome[1])
    engine.close()


def test_an_older_request_waiting_for_a_younger_one_s_chunks_lets_it_run(config: KvcakeConfig) -> None:
    """An echoed prompt's log probabilities come before its prefill, so a younger request with the same prompt
    starts computing the prefix first; the older one then waits for those chunks, and the scheduler must run
    the younger one meanwhile (it used to give every unit to the oldest prefill: both stalled)."""
    engine = Engine(config)
    prompt = list(range(3, 3 + 5 * 32 + 7))
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=4)
    echoed, plain = _Collector(), _Collector()
    request = _greedy(prompt, "cake", tokens=2)
    worker.submit(Job(request=request, planned=engine.check(request), emit=echoed.emit, logprobs=0, prompt_logprobs=True))
    worker.submit(Job(request=request, planned=engine.check(request), emit=plain.emit))
    assert echoed.done.wait(120) and plain.done.wait(120), "neither request may stall"
    worker.close()
    assert echoed.outcome[0] == plain.outcome[0] == "done" and echoed.tokens == plain.tokens
    engine.close()


def test_an_echoed_prompt_s_log_probabilities_come_first_and_match_a_full_forward(config: KvcakeConfig) -> None:
    engine = Engine(config)
    prompt = list(range(3, 90))
    worker = ComputeWorker(engine, max_queue=8, io_threads=0, on_finished=lambda metrics, cancelled: None, max_batch=2)
    events: list[Event] = []
    done = threading.Event()
    job = Job(request=_greedy(prompt, tokens=3), planned=engine.check(_greedy(prompt, tokens=3)), emit=lambda e: (events.append(e), isinstance(e, Done) and done.set()),
              logprobs=0, prompt_logprobs=True)
    worker.submit(job)
    assert done.wait(120)
    worker.close()
    assert [_kind(event) for event in events] == ["prompt_logprobs", "token", "token", "token", "done"]
    model = engine.model
    with torch.inference_mode():
        full = torch.log_softmax(model.forward(torch.tensor(prompt), torch.arange(len(prompt)), model.new_cache(len(prompt)), all_logits=True).logits, dim=-1)
    served = [entry.logprob for entry in events[0].entries[1:]]
    expected = [float(full[i, token]) for i, token in enumerate(prompt[1:])]
    assert max(abs(a - b) for a, b in zip(served, expected)) <= 1e-4
    engine.close()
