"""What a hostile or careless client, or a misbehaving store, must not be able to do (issue: reliability).

Each test names the defect it guards against; all run against real servers and stores.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch
from live import LiveServer

from kvcake.reuse import LayerPrefetcher
from kvcake.config import ConfigError, KvcakeConfig, load_config
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, RequestError
from kvcake.model import SamplingParams
from kvcake.reuse import drain
from kvcake.store import ChunkKV, prefix_chunk_keys
from kvcake.store.backend import BackendError
from kvcake.store.bytestore import ByteStore
from kvcake.store.local_redis import LocalRedis, redis_available
from kvcake.store.memory import MemoryBackend

CHUNK = 32
DOCUMENTS = ["The lighthouse keeper wrote every ship's name in a blue book. " * 3, "The mill by the river floods each spring. " * 4]


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _metrics(url: str, headers: dict[str, str] | None = None) -> str:
    return urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers or {})).read().decode()


def _metric(text: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")), 0.0)


def _wait_for(check: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---- 1. an entry stored under the wrong key ------------------------------------------------


def _redis_swap(server: LocalRedis) -> Callable[[str, str], None]:
    client = server.client()
    return lambda source, target: client.set(f"kvcake:{target}", client.get(f"kvcake:{source}"))


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_an_entry_swapped_under_another_key_is_a_counted_miss(config: KvcakeConfig, tmp_path: Path, backend: str) -> None:
    """Copy one valid chunk over another: load and cake still answer as compute, and /metrics counts foreign_key."""
    if backend == "redis":
        if not redis_available():
            pytest.skip("redis-server not installed")
        server = LocalRedis(tmp_path / "redis").start()
        url, swap = server.url, _redis_swap(server)
    else:
        url = f"file://{tmp_path}/kv"
        swap = lambda source, target: shutil.copyfile(f"{tmp_path}/kv/{source[:2]}/{source}.kv", f"{tmp_path}/kv/{target[:2]}/{target}.kv")  # noqa: E731
    engine = Engine(config.replace(store_url=url))
    try:
        with LiveServer(engine) as live:
            client = live.client()
            prompt, other = _prompt(1, 4 * CHUNK + 3), _prompt(2, 4 * CHUNK + 3)
            reference = client.completions.create(model=config.model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"reuse": "compute"})
            client.completions.create(model=config.model, prompt=other, max_tokens=1, temperature=0)
            engine.flush()
            keys = prefix_chunk_keys(engine.fingerprint, "", prompt, CHUNK)
            other_keys = prefix_chunk_keys(engine.fingerprint, "", other, CHUNK)
            for index in range(4):
                swap(other_keys[index], keys[index])
            for reuse in ("load", "cake"):
                answer = client.completions.create(model=config.model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"reuse": reuse})
                assert answer.choices[0].text == reference.choices[0].text
                if reuse == "load":  # its loader met the swapped tail first; later requests find it rewritten
                    assert answer.model_extra["kvcake"]["tokens_loaded"] == 0
            assert _metric(_metrics(live.url), 'kvcake_store_errors{kind="foreign_key"}') >= 1
    finally:
        engine.close()
        if backend == "redis":
            server.kill()


# ---- 2. a non-streamed request whose client left -----------------------------------------


class _Gate:
    """Holds the compute thread at its next call of the model's `methods` until `release()`, so a request
    cannot finish, however fast the machine, while the test arranges what happens beside it. `calls`
    records the first argument of every gated call."""

    def __init__(self, engine: Engine, *methods: str) -> None:
        self.reached, self._open, self.calls = threading.Event(), threading.Event(), []
        for name in methods:
            setattr(engine.model, name, self._gated(getattr(engine.model, name)))

    def _gated(self, method):
        def after_the_gate(*args, **kwargs):
            self.calls.append(args[0])
            self.reached.set()
            assert self._open.wait(60)
            return method(*args, **kwargs)

        return after_the_gate

    def release(self) -> None:
        self._open.set()


DISCONNECTS = "kvcake_client_disconnects_total"


def test_a_non_streamed_request_stops_when_its_client_leaves(config: KvcakeConfig) -> None:
    engine = Engine(config)
    gate = _Gate(engine, "decode_batch")
    with LiveServer(engine) as live:
        impatient = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=config.model, prompt="go on and on", max_tokens=3500, temperature=0)
        assert gate.reached.is_set(), "the request was decoding when its client left"
        _wait_for(lambda: _metric(_metrics(live.url), DISCONNECTS) == 1.0, "the server to see the client leave")
        gate.release()
        _wait_for(lambda: _metric(_metrics(live.url), "kvcake_requests_cancelled_total") == 1.0, "the abandoned request to be cancelled")
        assert _metric(_metrics(live.url), 'kvcake_tokens_total{kind="generated"}') <= 2, "it stopped at the step it was held at"
        assert live.client().completions.create(model=config.model, prompt="next", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    engine.close()


def test_a_request_whose_client_left_while_queued_is_answered_and_skipped(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(max_batch=1))  # one slot: the second request has to queue
    gate = _Gate(engine, "decode_batch")
    with LiveServer(engine) as live:
        slow = live.client().completions.create(model=config.model, prompt="a long answer", max_tokens=3000, temperature=0, stream=True)
        next(iter(slow))
        impatient = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=config.model, prompt="queued", max_tokens=5, temperature=0)
        _wait_for(lambda: _metric(_metrics(live.url), DISCONNECTS) == 1.0, "the server to see the queued request's client leave")
        slow.close()
        gate.release()
        gone = 'kvcake_requests_total{endpoint="/v1/completions",status="499"}'
        _wait_for(lambda: _metric(_metrics(live.url), gone) == 1.0, "the skipped request's route to return")
    engine.close()


# ---- 3. warming goes through the compute queue -----------------------------------------------


def test_warming_waits_in_the_compute_queue_and_gets_429_when_it_is_full(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(max_queue=1, io_threads=0, max_batch=1))
    with LiveServer(engine) as server:
        client = server.client()
        slow = client.completions.create(model=config.model, prompt="a long answer", max_tokens=3000, temperature=0, stream=True)
        next(iter(slow))
        queued = threading.Thread(target=lambda: server.client().post("/kv/documents", body={"documents": DOCUMENTS[:1]}, cast_to=object))
        queued.start()
        _wait_for(lambda: _metric(_metrics(server.url), "kvcake_queue_depth") == 1.0, "the warm call to be queued")
        with pytest.raises(openai.RateLimitError):
            client.post("/kv/documents", body={"documents": DOCUMENTS[1:]}, cast_to=object)
        slow.close()
        queued.join(timeout=60)
        assert not queued.is_alive()
        warmed = client.post("/kv/documents", body={"documents": DOCUMENTS}, cast_to=object)
        assert [d["already_stored"] for d in warmed["data"]] == [True, False]
    engine.close()


def test_a_warm_call_whose_client_leaves_stops_at_its_next_pass(config: KvcakeConfig) -> None:
    """A warm call held at its first pass of documents: its client leaves, and once the pass may go on the call
    stops there, counted as cancelled, with the later documents not computed or stored."""
    engine = Engine(config.replace(io_threads=0))
    documents = [f"Entry {i}: the tide table lists high and low water for each day. " * 4 for i in range(12)]
    gate = _Gate(engine, "forward", "forward_isolated")
    with LiveServer(engine) as live:
        impatient = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.post("/kv/documents", body={"documents": documents}, cast_to=object)
        assert gate.reached.is_set()
        _wait_for(lambda: _metric(_metrics(live.url), DISCONNECTS) == 1.0, "the server to see the client leave")
        gate.release()
        _wait_for(lambda: _metric(_metrics(live.url), "kvcake_requests_cancelled_total") == 1.0, "the warm call to be cancelled")
        preamble, ids = engine.planner.plan_documents(documents, True, None)
        stored = [engine.store.contains(engine.strategies["blend"].document_key(config.tenant, preamble, doc)) for doc in ids]
        assert not any(stored), "a call stopped before its last pass stores nothing of it"
    engine.close()


def _eight_at_once(live: LiveServer, gate: _Gate, call: Callable[[], object]) -> list:
    """Eight clients make `call` at once: the first is held at the gate until the other seven wait in the queue."""
    replies: list[object] = []
    callers = [threading.Thread(target=lambda: replies.append(call())) for _ in range(8)]
    for caller in callers:
        caller.start()
    assert gate.reached.wait(60)
    _wait_for(lambda: _metric(_metrics(live.url), "kvcake_queue_depth") == 7.0, "the other seven calls to queue")
    gate.release()
    for caller in callers:
        caller.join(60)
    assert len(replies) == 8
    return replies


@pytest.mark.parametrize("layout", ["plain", "tune"])
def test_identical_warm_calls_at_once_compute_each_document_once(config: KvcakeConfig, layout: str) -> None:
    """Eight clients warm the same documents at once: the first computes them, the others wait for its entries."""
    engine = Engine(config.replace(reuse="tune" if layout == "tune" else "blend", io_threads=0, chunk_size=128))
    documents = [f"Shelf {i}: the harbour master logs each ship." for i in range(3)]  # packed into one pass
    gate = _Gate(engine, "forward_isolated")
    with LiveServer(engine) as live:
        replies = _eight_at_once(live, gate, lambda: live.client().post("/kv/documents", body={"documents": documents}, cast_to=object))
        assert all(len(reply["data"]) == len(documents) for reply in replies)
    assert sum(len(segments) for segments in gate.calls) == len(documents), "each document computed once"
    assert engine.store.stats().puts == len(documents) * (2 if layout == "tune" else 1)
    engine.close()


def test_identical_cold_prompts_at_once_compute_their_prefix_once(config: KvcakeConfig) -> None:
    """Eight clients send the same long prompt at once: one computes its chunks, the others load them once
    written, and all get the same answer."""
    engine = Engine(config.replace(io_threads=0))
    prompt = _prompt(9, 6 * CHUNK + 5)
    with Engine(config) as alone:
        reference = alone.generate(GenerateRequest(token_ids=prompt, reuse="compute", sampling=SamplingParams(max_tokens=3)))
    gate = _Gate(engine, "forward")
    with LiveServer(engine) as live:
        replies = _eight_at_once(live, gate, lambda: live.client().completions.create(
            model=config.model, prompt=prompt, max_tokens=3, temperature=0, extra_body={"reuse": "cake"}))
    engine.close()
    assert {reply.choices[0].text for reply in replies} == {reference.text}
    computed = sorted(reply.model_extra["kvcake"]["tokens_computed"] for reply in replies)
    assert computed == [len(prompt) - 6 * CHUNK] * 7 + [len(prompt)], "one computed the prompt, seven loaded its 6 chunks"


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(config: KvcakeConfig) -> None:
    """On an idle server a 429 with Retry-After would never succeed: the body is refused naming the limit."""
    engine = Engine(config.replace(max_queue=2))
    with LiveServer(engine) as live:
        with pytest.raises(openai.BadRequestError, match="max_queue = 2"):
            live.client().completions.create(model=config.model, prompt=["a", "b", "c"], max_tokens=1)
        assert len(live.client().completions.create(model=config.model, prompt=["a", "b"], max_tokens=1).choices) == 2
    engine.close()


# ---- 4. bodies too long for the context are refused before tokenizing -----------------------


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(live: LiveServer, config: KvcakeConfig) -> None:
    engine = live.engine
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text: calls.append(len(text)) or encode(text)  # type: ignore[method-assign]
    huge = "lighthouse " * (engine.context_length * engine.tokenizer.max_token_chars // 11 + 1)
    try:
        with pytest.raises(openai.BadRequestError, match="characters"):
            live.client().completions.create(model=config.model, prompt=huge, max_tokens=1)
    finally:
        engine.tokenizer.encode = encode  # type: ignore[method-assign]
    assert all(n < len(huge) for n in calls), "the huge text was never tokenized"


def test_text_under_the_character_bound_but_over_the_context_is_refused_after_a_sample(live: LiveServer, config: KvcakeConfig) -> None:
    """Ordinary text just under the loose character bound: only a sample as long as a full prompt would be is
    tokenized before the 400, not the whole body."""
    engine = live.engine
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text: calls.append(len(text)) or encode(text)  # type: ignore[method-assign]
    under = ("lighthouse " * (engine.context_length * engine.tokenizer.max_token_chars // 11))[: engine.context_length * engine.tokenizer.max_token_chars]
    try:
        with pytest.raises(openai.BadRequestError, match="more than the model's context"):
            live.client().completions.create(model=config.model, prompt=under, max_tokens=1)
    finally:
        engine.tokenizer.encode = encode  # type: ignore[method-assign]
    assert calls and max(calls) <= engine.context_length * 8 < len(under)


# ---- 5. metric labels are route templates --------------------------------------------------


def test_random_paths_do_not_grow_the_metrics(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(api_keys="key-a:alice"))
    with LiveServer(engine) as server:
        for index in range(40):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{server.url}/v1/random-{index}")
        text = _metrics(server.url)
    engine.close()
    assert "random-" not in text
    assert 'kvcake_requests_total{endpoint="unknown",status="401"} 40.0' in text


# ---- 6. many small documents are computed together -------------------------------------


def test_many_small_documents_are_computed_in_few_passes(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(max_documents=200, chunk_size=256))
    passes = []
    forward = engine.model.forward
    forward_isolated = engine.model.forward_isolated
    engine.model.forward = lambda *a, **k: passes.append("forward") or forward(*a, **k)  # type: ignore[method-assign]
    engine.model.forward_isolated = lambda *a, **k: passes.append("isolated") or forward_isolated(*a, **k)  # type: ignore[method-assign]
    documents = [f"Note {i}: the bell rang {i} times." for i in range(120)]
    request = GenerateRequest(query="How often?", documents=documents, system="Be brief.", reuse="blend", ratio=0.2, sampling=SamplingParams(max_tokens=1))
    result = engine.generate(request)
    document_tokens = result.metrics.documents.document_tokens
    assert result.metrics.documents.documents_computed == 120
    assert passes.count("isolated") <= -(-document_tokens // 256) + len(documents) // 10, "documents are packed, not computed one by one"
    passes.clear()
    engine.flush()
    again = engine.generate(request)
    assert again.metrics.documents.documents_stored == 120 and "isolated" not in passes
    with pytest.raises(RequestError, match="max_documents"):
        engine.generate(GenerateRequest(query="q", documents=["d"] * 201))
    engine.close()


def test_a_packed_document_equals_the_document_computed_alone(config: KvcakeConfig) -> None:
    engine = Engine(config)
    preamble = (1, 7, 9, 11)
    documents = [_prompt(i, n) for i, n in enumerate([5, 9, 3, 40])]
    packed = drain(engine.strategies["blend"].compute(documents, preamble))
    for document, together in zip(documents, packed):
        [alone] = drain(engine.strategies["blend"].compute([document], preamble))
        for a, b in zip(alone.keys + alone.values, together.keys + together.values):
            assert torch.allclose(a, b, atol=1e-5)
    engine.close()


def test_too_many_documents_are_a_clear_400(live: LiveServer, config: KvcakeConfig) -> None:
    too_many = ["d"] * (config.max_documents + 1)
    with pytest.raises(openai.BadRequestError, match="max_documents"):
        live.client().chat.completions.create(
            model=config.model, messages=[{"role": "user", "content": "q"}], extra_body={"kv_documents": too_many}
        )
    with pytest.raises(openai.BadRequestError, match="max_documents"):
        live.client().post("/kv/documents", body={"documents": too_many}, cast_to=object)


# ---- 7. text that used to give a 500 ---------------------------------------------------------


def test_a_lone_surrogate_is_a_400_with_an_openai_body(live: LiveServer, config: KvcakeConfig) -> None:
    body = json.dumps({"model": config.model, "messages": [{"role": "user", "content": "hi \ud800"}]}).encode()
    status, error = _post(live.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and "surrogate" in error["error"]["message"]


def test_the_old_placeholder_text_is_served_like_any_text(live: LiveServer, config: KvcakeConfig) -> None:
    """Text that an older layout used as its documents' placeholder is part of the prompt, token for token,
    with documents (system + documents + query) and without (the chat template), and nothing is cut at it."""
    odd = "\ue000kvcake-documents\ue000"
    messages = [{"role": "system", "content": odd}, {"role": "user", "content": f"q {odd}"}]
    reference = Engine(config)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    expected = {
        "documents": reference.generate(GenerateRequest(query=f"q {odd}", documents=DOCUMENTS, system=odd, reuse="compute", sampling=greedy)),
        "chat": reference.generate(GenerateRequest(messages=messages, reuse="compute", sampling=greedy)),
    }
    chat_ids = reference.tokenizer.encode(reference.tokenizer.render_chat(messages))
    reference.close()
    assert expected["chat"].metrics.prompt_tokens == len(chat_ids)
    for name, extra in (("documents", {"kv_documents": DOCUMENTS, "reuse": "compute"}), ("chat", {"reuse": "compute"})):
        reply = live.client().chat.completions.create(model=config.model, messages=messages, max_tokens=2, temperature=0, extra_body=extra)
        assert reply.usage.prompt_tokens == expected[name].metrics.prompt_tokens
        assert reply.choices[0].message.content == expected[name].text


# ---- 8. smaller input checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"), [("seed", 2**64, "seed"), ("max_tokens", "3", "max_tokens"), ("stream", "yes", "stream")]
)
def test_out_of_range_or_mistyped_fields_are_refused_at_parse_time(live: LiveServer, config: KvcakeConfig, field: str, value: object, match: str) -> None:
    with pytest.raises(openai.BadRequestError, match=match):
        live.client().post("/completions", body={"model": config.model, "prompt": "hi", field: value}, cast_to=object)


def test_a_body_without_content_type_is_told_so(live: LiveServer, config: KvcakeConfig) -> None:
    status, error = _post(live.url + "/v1/completions", json.dumps({"model": config.model, "prompt": "hi"}).encode(), {"Content-Type": ""})
    assert status == 415 and "Content-Type" in error["error"]["message"]


def test_a_boolean_setting_typo_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCAKE_SHARED_DOCUMENTS", "ture")
    with pytest.raises(ConfigError, match="shared_documents"):
        load_config()
    monkeypatch.setenv("KVCAKE_SHARED_DOCUMENTS", "off")
    assert load_config().shared_documents is False


# ---- 9. honest accounting ---------------------------------------------------------------------


def test_chunks_that_fail_to_load_are_not_hits(config: KvcakeConfig, tmp_path: Path) -> None:
    engine = Engine(config.replace(store_url=f"file://{tmp_path}/kv"))
    prompt = _prompt(3, 6 * CHUNK + 3)
    request = GenerateRequest(token_ids=prompt, reuse="load", sampling=SamplingParams(max_tokens=2))
    reference = engine.generate(GenerateRequest(token_ids=prompt, reuse="compute", sampling=SamplingParams(max_tokens=2)))
    engine.flush()
    key = prefix_chunk_keys(engine.fingerprint, "", prompt, CHUNK)[2]
    data = bytearray(engine.store.backend.read_all(key))
    data[-5] ^= 0xFF
    engine.store.backend.write(key, bytes(data))
    result = engine.generate(request)
    report = result.metrics.prefix
    assert result.token_ids == reference.token_ids
    assert report.stored_chunks == 6 and report.load_failures == 1
    assert report.hit_chunks == report.chunks_loaded == 3
    assert result.metrics.tokens_loaded == 3 * CHUNK
    engine.close()


# ---- 10. eviction keeps a prefix's head --------------------------------------------------------


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_prefix_larger_than_the_store_still_hits_its_head(config: KvcakeConfig, tmp_path: Path, scheme: str) -> None:
    """Eviction takes a chain's tail first: a chunk is useless without the ones before it."""
    probe = Engine(config)
    probe.generate(GenerateRequest(token_ids=_prompt(5, CHUNK + 1), sampling=SamplingParams(max_tokens=1)))
    probe.flush()
    budget_gb = 4.5 * probe.store.stats().bytes_written / 1e9
    probe.close()
    url = f"memory://?max_gb={budget_gb}" if scheme == "memory" else f"file://{tmp_path}/kv?max_gb={budget_gb}"
    engine = Engine(config.replace(store_url=url))
    request = GenerateRequest(token_ids=_prompt(4, 10 * CHUNK + 3), reuse="cake", sampling=SamplingParams(max_tokens=1))
    engine.generate(request)
    engine.flush()
    again = engine.generate(request)
    assert 0 < again.metrics.prefix.stored_chunks < 10
    engine.close()


BIG_CHUNK = 640
"""Chunks of ~0.5 MB for the budget test: Redis's own allocations (tens of KB that come and go) stay small
beside an entry, as they are beside a real model's chunks of megabytes."""


def _chunk_bytes(config: KvcakeConfig) -> int:
    """The bytes one stored prefix chunk takes, measured."""
    probe = Engine(config)
    probe.generate(GenerateRequest(token_ids=_prompt(5, config.chunk_size + 1), sampling=SamplingParams(max_tokens=1)))
    probe.flush()
    written = probe.store.stats().bytes_written
    probe.close()
    return written


@pytest.mark.parametrize("store", ["memory", "file", "redis allkeys-lru", "redis noeviction"])
def test_a_prefix_twice_the_budget_hits_the_same_head_on_every_repeat(config: KvcakeConfig, tmp_path: Path, store: str) -> None:
    """A 6-chunk prompt asked 5 times with room for about 3 chunks: the store keeps a head of the chain (never a
    tail that cannot hit), and every repeat after the first hits the same number of chunks, Redis included
    (its approximate LRU would evict a random entry of the chain: the write-back skips the write that needs
    room instead). A full Redis with noeviction refuses puts: what it holds is a head too."""
    config = config.replace(chunk_size=BIG_CHUNK)
    chunk_bytes = _chunk_bytes(config)
    server = None
    if store.startswith("redis"):
        if not redis_available():
            pytest.skip("redis-server not installed")
        server = LocalRedis(tmp_path / "redis").start()
        client, url = server.client(), server.url
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + int(3.5 * chunk_bytes)))
        client.config_set("maxmemory-policy", store.split()[1])
    else:
        budget_gb = 3.5 * chunk_bytes / 1e9
        url = f"memory://?max_gb={budget_gb}" if store == "memory" else f"file://{tmp_path}/kv?max_gb={budget_gb}"
    engine = Engine(config.replace(store_url=url))
    try:
        request = GenerateRequest(token_ids=_prompt(4, 6 * BIG_CHUNK + 3), reuse="load", sampling=SamplingParams(max_tokens=1))
        chain = prefix_chunk_keys(engine.fingerprint, "", request.token_ids, BIG_CHUNK)
        hits = []
        for _ in range(5):
            hits.append(engine.generate(request).metrics.prefix.hit_chunks)
            engine.flush()
            present = [engine.store.contains(key) for key in chain]
            assert present == sorted(present, reverse=True), f"the stored part {present} is a head"
        assert hits[0] == 0 and 0 < hits[1] < 6 and len(set(hits[1:])) == 1, hits
    finally:
        engine.close()
        if server is not None:
            server.kill()


# ---- 11. /metrics behind a key -------------------------------------------------------------------


def test_metrics_can_require_a_key(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(metrics_api_key="watch-me"))
    with LiveServer(engine) as server:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _metrics(server.url)
        assert refused.value.code == 401
        assert "kvcake_queue_depth" in _metrics(server.url, {"Authorization": "Bearer watch-me"})
    engine.close()


# ---- 12. streaming decodes incrementally ---------------------------------------------------------


def test_the_stream_decoder_matches_decoding_the_whole_answer(live: LiveServer) -> None:
    tokenizer = live.engine.tokenizer
    ids = tokenizer.encode("Grüße, naïve café — 東京 🚢 ships.")
    decoder = tokenizer.stream_decoder()
    assert "".join(decoder.add(token) for token in ids) == tokenizer.decode(ids)


# ---- 13. a loader that hangs -----------------------------------------------------------------------


def test_a_layer_that_never_arrives_times_out() -> None:
    never = threading.Event()

    def hanging(layer: int) -> tuple[ChunkKV, int] | None:
        never.wait()
        return None

    prefetcher = LayerPrefetcher(hanging, range(3), timeout_s=0.2)
    assert prefetcher.get(0) is None and prefetcher.timed_out
    prefetcher.close()
    never.set()


class _HangingLayers(ByteStore):
    """A memory store whose layer reads hang (a stuck backend), until released."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(10**9))
        self.release = threading.Event()

    def get_layer(self, key: str, layer: int):
        self.release.wait()
        return super().get_layer(key, layer)


def test_a_hanging_store_makes_blend_compute_instead(config: KvcakeConfig) -> None:
    store = _HangingLayers()
    engine = Engine(config.replace(load_timeout_s=0.3), store=store)
    engine.warm(DOCUMENTS)
    request = GenerateRequest(query="Which book?", documents=DOCUMENTS, reuse="blend", ratio=0.2, sampling=SamplingParams(max_tokens=2))
    result = engine.generate(request)
    store.release.set()
    assert "did not arrive in time" in result.metrics.documents.fallback
    full = engine.generate(GenerateRequest(query="Which book?", documents=DOCUMENTS, reuse="compute", sampling=SamplingParams(max_tokens=2)))
    assert result.token_ids == full.token_ids
    engine.close()


# ---- 14. programming errors are not silent misses ---------------------------------------------------


class _BuggyBackend(MemoryBackend):
    def read_all(self, key: str):
        raise TypeError("a bug, not an outage")


def test_a_programming_error_in_a_backend_is_raised_not_swallowed() -> None:
    store = ByteStore(_BuggyBackend(10**6))
    with pytest.raises(TypeError, match="a bug"):
        store.get("k")


def test_backend_failures_are_still_misses() -> None:
    class Full(MemoryBackend):
        def write(self, key: str, data: bytes) -> None:
            raise BackendError("too_large", "no room")

    store = ByteStore(Full(10**6))
    assert store.put("k", ChunkKV([torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 2)])) is False
    assert store.stats().errors == {"too_large": 1}
