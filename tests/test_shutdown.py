"""A normal stop loses nothing promised to the store: SIGTERM to `kvcake serve`, an Engine never closed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
from live import LiveServer

from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.server.background import free_port

CHUNK = 32
CHUNKS = 31
SLOW_LINK = "throttle_gbps=0.002"
"""Writes cross an emulated 2 Mbps link: the answer's 31 chunks (~24 KB each) take ~3 s to store, so they are
still pending when the stop comes, on any machine."""


def _prompt() -> list[int]:
    return [3 + (i * 7) % 500 for i in range(CHUNKS * CHUNK + 5)]


def _stored_entries(store_dir: Path) -> int:
    return sum(1 for _ in store_dir.rglob("*.kv"))


def _hits_after_a_restart(config: KvcakeConfig, store_dir: Path) -> int:
    engine = Engine(config.replace(store_url=f"file://{store_dir}"))
    with LiveServer(engine) as live:
        reply = live.client().completions.create(model=config.model, prompt=_prompt(), max_tokens=1, extra_body={"reuse": "load"})
    engine.close()
    return reply.model_extra["kvcake"]["prefix_hit_chunks"]


def test_sigterm_after_a_long_answer_writes_every_chunk_back_and_exits_0(config: KvcakeConfig, tmp_path: Path) -> None:
    store_dir, port = tmp_path / "kv", free_port()
    command = [sys.executable, "-m", "kvcake.cli", "serve", "--model", config.model, "--dtype", "float32", "--chunk-size", str(CHUNK),
               "--store-url", f"file://{store_dir}?{SLOW_LINK}", "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        client.completions.create(model=config.model, prompt=_prompt(), max_tokens=1, extra_body={"reuse": "compute"})
        assert _stored_entries(store_dir) < CHUNKS, "writes were still pending when the stop came"
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0, server.stderr.read()
    finally:
        server.kill()
        server.wait()
    assert _stored_entries(store_dir) == CHUNKS
    assert _hits_after_a_restart(config, store_dir) == CHUNKS


def test_an_engine_never_closed_writes_back_at_exit_and_exits_0(config: KvcakeConfig, tmp_path: Path) -> None:
    store_dir = tmp_path / "kv"
    script = textwrap.dedent(f"""
        from kvcake.config import KvcakeConfig
        from kvcake.engine import Engine
        from kvcake.model import SamplingParams
        from kvcake.requests import GenerateRequest
        config = KvcakeConfig(model={config.model!r}, dtype="float32", chunk_size={CHUNK}, cache_dir={str(tmp_path / "cache")!r},
                              store_url={f"file://{store_dir}?{SLOW_LINK}"!r})
        engine = Engine(config)
        engine.generate(GenerateRequest(token_ids={_prompt()!r}, reuse="compute", sampling=SamplingParams(max_tokens=1)))
        print(sum(1 for _ in __import__("pathlib").Path({str(store_dir)!r}).rglob("*.kv")))
    """)
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert finished.returncode == 0, finished.stderr
    assert int(finished.stdout.split()[-1]) < CHUNKS, "writes were still pending at exit"
    assert _stored_entries(store_dir) == CHUNKS
    assert _hits_after_a_restart(config, store_dir) == CHUNKS
