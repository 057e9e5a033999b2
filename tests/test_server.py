"""The HTTP API through the official `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import urllib.request
import weakref
from pathlib import Path

import openai
import pytest
from live import LiveServer

from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.model import SamplingParams
from kvcake.requests import GenerateRequest

DOCUMENTS = ["The lighthouse keeper wrote every ship's name in a blue book. " * 3, "The mill by the river floods each spring. " * 4]


def test_completion_and_chat_match_the_engine(config: KvcakeConfig) -> None:
    """The served text and token counts are what the engine itself generates for the same prompt (an engine of
    its own, so nothing the server stored can make the two agree)."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    messages = [{"role": "user", "content": "Hello there"}]
    reference = Engine(config)
    plain = reference.generate(GenerateRequest(prompt="Once upon a time", chat=False, sampling=greedy, reuse="compute"))
    chatted = reference.generate(GenerateRequest(messages=messages, sampling=greedy, reuse="compute"))
    reference.close()
    served = Engine(config)
    with LiveServer(served) as live:
        client = live.client()
        completion = client.completions.create(model=config.model, prompt="Once upon a time", max_tokens=6, temperature=0)
        assert completion.choices[0].text == plain.text and completion.choices[0].finish_reason == plain.finish_reason
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (plain.metrics.prompt_tokens, plain.metrics.generated_tokens)
        chat = client.chat.completions.create(model=config.model, messages=messages, max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == chatted.text
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (chatted.metrics.prompt_tokens, chatted.metrics.generated_tokens)
        assert [m.id for m in client.models.list().data] == [config.model]
    served.close()


def test_streaming_sends_the_same_text_and_usage_last(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    whole = client.chat.completions.create(model=config.model, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=config.model, messages=messages, max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=config.model, prompt="Rivers", max_tokens=6, temperature=0, stream=True))
    assert streamed == client.completions.create(model=config.model, prompt="Rivers", max_tokens=6, temperature=0).choices[0].text


def test_documents_through_extra_body_are_reused(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    warmed = client.post("/kv/documents", body={"documents": DOCUMENTS, "system": "Be brief."}, cast_to=object)
    assert [d["already_stored"] for d in warmed["data"]] == [False, False]
    extra = {"kv_documents": DOCUMENTS, "reuse": "blend", "ratio": 0.2}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the book?"}]
    reply = client.chat.completions.create(model=config.model, messages=messages, max_tokens=4, temperature=0, extra_body=extra)
    accounting = reply.model_extra["kvcake"]
    assert accounting["reuse"] == "blend" and accounting["documents_stored"] == 2 and accounting["tokens_loaded"] > 0
    exact = client.chat.completions.create(
        model=config.model, messages=[{"role": "user", "content": "What colour is the book?"}], max_tokens=4, temperature=0,
        extra_body={"kv_documents": DOCUMENTS, "reuse": "compute"},
    )
    assert exact.model_extra["kvcake"]["tokens_loaded"] == 0 and exact.model_extra["kvcake"]["reuse"] == "compute"


def test_bad_requests_raise_the_clients_exceptions(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=config.model, prompt="hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=config.model, prompt=[5] * 5000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="reuse strategy"):
        client.completions.create(model=config.model, prompt="hi", extra_body={"reuse": "sideways"})
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=config.model, messages=[])
    request = urllib.request.Request(live.url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request)
    assert raised.value.code == 400 and "not valid JSON" in json.loads(raised.value.read())["error"]["message"]
    assert client.completions.create(model=config.model, prompt="still fine", max_tokens=2, temperature=0).usage.completion_tokens >= 1


def test_oversized_body_is_refused(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(max_body_bytes=2000))
    with LiveServer(engine) as server, pytest.raises(openai.APIStatusError) as raised:
        server.client().completions.create(model=config.model, prompt="x" * 5000)
    assert raised.value.status_code == 413
    engine.close()


def test_tenants_never_share_cache_entries(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(api_keys="key-a:alice,key-b:bob"))
    prompt = list(range(3, 3 + 96))
    with LiveServer(engine) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").completions.create(model=config.model, prompt=prompt, max_tokens=1)
        alice, bob = server.client("key-a"), server.client("key-b")
        first = alice.completions.create(model=config.model, prompt=prompt, max_tokens=1, temperature=0)
        engine.flush()
        before = engine.store.stats()
        other = bob.completions.create(model=config.model, prompt=prompt, max_tokens=1, temperature=0)
        engine.flush()
        after = engine.store.stats()
        assert other.model_extra["kvcake"]["prefix_hit_chunks"] == 0 and after.hits == before.hits
        again = alice.completions.create(model=config.model, prompt=prompt, max_tokens=1, temperature=0)
        assert again.model_extra["kvcake"]["prefix_hit_chunks"] > 0
        assert first.choices[0].text == other.choices[0].text == again.choices[0].text
    engine.close()


def test_metrics_and_health(live: LiveServer, config: KvcakeConfig) -> None:
    live.client().completions.create(model=config.model, prompt="count me", max_tokens=2, temperature=0)
    assert json.loads(urllib.request.urlopen(live.url + "/health").read())["status"] == "ok"
    text = urllib.request.urlopen(live.url + "/metrics").read().decode()
    assert "kvcake_ttft_seconds_count 1.0" in text
    assert 'kvcake_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert "kvcake_queue_depth 0.0" in text and 'kvcake_store{counter="bytes_written"}' in text
    assert re.search(r"^kvcake_starting [01]\.0$", text, re.MULTILINE)


def test_sixteen_concurrent_clients_get_the_serial_answers(config: KvcakeConfig) -> None:
    shared_prefixes = [[7 + p] * 80 for p in range(4)]
    prompts = [shared_prefixes[i % 4] + [20 + i, 21 + i] if i % 2 == 0 else [40 + i] * (30 + i) for i in range(40)]
    engine = Engine(config)
    with LiveServer(engine) as server:
        client = server.client()
        serial = {i: client.completions.create(model=config.model, prompt=prompts[i], max_tokens=4, temperature=0).choices[0].text for i in range(40)}
        rss_before = _rss_bytes()

        def run_client(client_index: int) -> list[tuple[int, str]]:
            own = server.client()
            picks = [(client_index * 10 + k) % 40 for k in range(10)]
            return [(i, own.completions.create(model=config.model, prompt=prompts[i], max_tokens=4, temperature=0).choices[0].text) for i in picks]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            answers = [pair for result in pool.map(run_client, range(16)) for pair in result]
        rss_after = _rss_bytes()
    engine.close()
    assert len(answers) == 160
    assert all(text == serial[i] for i, text in answers)
    assert rss_after - rss_before < 512 << 20


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_full_queue_answers_429_with_retry_after(config: KvcakeConfig) -> None:
    engine = Engine(config.replace(max_queue=1, max_batch=2))
    with LiveServer(engine) as server:
        slow = server.client().completions.create(model=config.model, prompt="a long answer", max_tokens=3000, temperature=0, stream=True)
        also_slow = server.client().completions.create(model=config.model, prompt="a long answer", max_tokens=3000, temperature=0, stream=True)
        next(iter(also_slow))  # both slots of the batch are taken now
        next(iter(slow))
        queued = threading.Thread(target=lambda: server.client().completions.create(model=config.model, prompt="wait", max_tokens=1))
        queued.start()
        deadline = time.monotonic() + 60
        while server_queue_depth(server) < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as raised:
            server.client().completions.create(model=config.model, prompt="no room", max_tokens=1)
        assert raised.value.response.headers["retry-after"] == "1"
        slow.close()
        also_slow.close()
        queued.join()
    engine.close()


def server_queue_depth(server: LiveServer) -> int:
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("kvcake_queue_depth "))))


def test_a_client_that_disconnects_mid_stream_frees_the_worker(live: LiveServer, config: KvcakeConfig) -> None:
    client = live.client()
    stream = client.completions.create(model=config.model, prompt="go on and on", max_tokens=2000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    after = client.completions.create(model=config.model, prompt="next", max_tokens=2, temperature=0)
    assert after.usage.completion_tokens >= 1
    text = urllib.request.urlopen(live.url + "/metrics").read().decode()
    generated = float(next(line.split()[1] for line in text.splitlines() if line.startswith('kvcake_tokens_total{kind="generated"}')))
    assert generated < 2000, "the abandoned stream stopped generating"
    assert "kvcake_requests_cancelled_total 1.0" in text


def test_demo_serves_and_reuses_the_document(tiny_folders: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from kvcake.cli import main

    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--store-url", "memory://", "--chunk-size", "64", "--max-tokens", "3"]
    assert main(["demo", "--document-chars", "3000", *flags]) == 0
    err = capsys.readouterr().err
    first, second = [line for line in err.splitlines() if line.startswith("[kvcake] ttft=")]
    assert "stored_chunks_hit=0 " in first and "loaded=0 " in first
    assert "stored_chunks_hit=0 " not in second and "(computed) ->" in err


@pytest.mark.parametrize("shared", [False, True])
def test_documents_are_per_tenant_unless_shared(config: KvcakeConfig, shared: bool) -> None:
    engine = Engine(config.replace(api_keys="key-a:alice,key-b:bob", shared_documents=shared))
    with LiveServer(engine) as server:
        server.client("key-a").post("/kv/documents", body={"documents": DOCUMENTS}, cast_to=object)
        reply = server.client("key-b").chat.completions.create(
            model=config.model, messages=[{"role": "user", "content": "Which book?"}], max_tokens=2, temperature=0,
            extra_body={"kv_documents": DOCUMENTS},
        )
    engine.close()
    assert reply.model_extra["kvcake"]["documents_stored"] == (2 if shared else 0)


def test_missing_fields_name_the_field(live: LiveServer, config: KvcakeConfig) -> None:
    with pytest.raises(openai.BadRequestError, match="prompt"):
        live.client().post("/completions", body={"model": config.model}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="kv_documents"):
        live.client().post("/completions", body={"model": config.model, "prompt": "q", "kv_documents": "not a list"}, cast_to=object)


def test_a_stopped_server_keeps_no_engine_alive(config: KvcakeConfig) -> None:
    """FastAPI caches endpoint callables process-wide; a stopped server's engine must still be freed."""
    engine = Engine(config)
    with LiveServer(engine) as server:
        assert server.client().completions.create(model=config.model, prompt="Hello", max_tokens=2).choices[0].text is not None
        server.client().chat.completions.create(model=config.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    engine.close()
    freed = weakref.ref(engine)
    del engine, server
    gc.collect()
    assert freed() is None


def test_a_warm_call_names_the_layout_it_stores(config: KvcakeConfig) -> None:
    """On a server whose reuse is cake, a warm call with reuse=tune stores CacheTune's scored layout, which a tune
    request then finds; a warm call naming another mode is a 400."""
    engine = Engine(config.replace(reuse="cake"))
    with LiveServer(engine) as live:
        client = live.client()
        warmed = client.post("/kv/documents", body={"documents": DOCUMENTS, "reuse": "tune"}, cast_to=object)
        assert [d["already_stored"] for d in warmed["data"]] == [False, False]
        messages = [{"role": "user", "content": "What colour is the book?"}]
        reply = client.chat.completions.create(model=config.model, messages=messages, max_tokens=2, extra_body={"kv_documents": DOCUMENTS, "reuse": "tune"})
        assert reply.model_extra["kvcake"]["documents_stored"] == 2
        plain = client.chat.completions.create(model=config.model, messages=messages, max_tokens=2, extra_body={"kv_documents": DOCUMENTS, "reuse": "blend"})
        assert plain.model_extra["kvcake"]["documents_stored"] == 0, "the plain layout was not stored"
        with pytest.raises(openai.BadRequestError, match="reuse"):
            client.post("/kv/documents", body={"documents": DOCUMENTS, "reuse": "cake"}, cast_to=object)
    engine.close()
