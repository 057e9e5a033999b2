"""`kvcake bench serve --workload decode|stall`: what continuous batching buys, measured in one run.

decode: `--clients` clients at once, each a short prompt and `--decode-tokens` generated
tokens, against two servers that differ only in `max_batch` (1: one request at a time;
`max_batch`, default 8: decode steps shared). They take turns round by round, so a drift of the
machine's speed weighs on both alike; the report gives output tokens per second.

stall: one client streams a long answer while another sends a `--stall-prompt-tokens`
prompt. The streaming client's longest gap between two tokens during that prefill is set
against the time of one prefill chunk (the slowest, the last one, timed alone in the
same run): with batching a decode step waits for at most one chunk, without it for the
whole prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from tqdm import tqdm

from kvcake.bench.report import machine_description, write_report
from kvcake.config import KvcakeConfig
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.model import resolve_device, resolve_dtype
from kvcake.server.background import BackgroundServer

TOPICS = ["a lighthouse", "a river", "a mountain village", "a clockmaker", "the first snow", "a train at night",
          "an old library", "a sailing race", "a market square", "a forest fire", "a chess game", "a harbour"]


class _Server:
    def __init__(self, config: KvcakeConfig) -> None:
        self.engine = Engine(config)
        self.server = BackgroundServer(self.engine)

    def __enter__(self) -> _Server:
        try:
            self.server.__enter__()
        except BaseException:
            self.engine.close()
            raise
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)
        self.engine.close()


def run_decode(config: KvcakeConfig, args: argparse.Namespace) -> dict:
    """Output tokens/s of `--clients` concurrent decode-heavy requests, batched against one at a time."""
    prompts = [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(args.clients)]
    settings = {1: "one at a time (max_batch 1)", config.max_batch: f"batched (max_batch {config.max_batch})"}
    servers = {batch: _Server(config.replace(max_batch=batch, store_url="memory://")) for batch in settings}
    tokens = dict.fromkeys(settings, 0)
    seconds = dict.fromkeys(settings, 0.0)
    try:
        for server in servers.values():
            server.__enter__()
            _complete(server, config.model, prompts[0], 4)  # untimed warm-up
        for index in tqdm(range(args.rounds), desc="decode rounds", unit="round"):
            order = list(settings) if index % 2 == 0 else list(settings)[::-1]
            for batch in order:
                started = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    tokens[batch] += sum(pool.map(lambda p, s=servers[batch]: _complete(s, config.model, p, args.decode_tokens), prompts))
                seconds[batch] += time.perf_counter() - started
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    rows = [{"server": label, "output tokens": tokens[batch], "seconds": round(seconds[batch], 2),
             "output tokens/s": round(tokens[batch] / seconds[batch], 2)} for batch, label in settings.items()]
    ratio = (tokens[config.max_batch] / seconds[config.max_batch]) / (tokens[1] / seconds[1])
    return {"rows": rows, "batched / one at a time": round(ratio, 2)}


def _complete(server: _Server, model: str, prompt: str, max_tokens: int) -> int:
    """A chat request that must produce `max_tokens` tokens; the completion tokens it produced."""
    reply = server.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.8, seed=len(prompt),
    )
    return reply.usage.completion_tokens


def run_stall(config: KvcakeConfig, args: argparse.Namespace) -> dict:
    """The streaming client's longest token gap while another client's long prompt prefills, and while a warm
    call computes one document of the same length, against the slowest prefill chunk timed alone."""
    rows = []
    with _Server(config.replace(max_batch=config.max_batch, store_url="memory://")) as server:
        prompt = _long_prompt(server.engine, args.stall_prompt_tokens)
        chunk_s = _slowest_chunk_seconds(server.engine, prompt)
        document = server.engine.tokenizer.decode(prompt)
        beside = {
            "a long prompt's prefill": lambda: server.client.completions.create(
                model=config.model, prompt=prompt, max_tokens=1, extra_body={"reuse": "compute"}),
            "a warm call of one long document": lambda: server.client.post("/kv/documents", body={"documents": [document]}, cast_to=object),
        }
        for what, send in beside.items():
            gaps, busy_s = _gaps_during(server, config.model, send, args.stream_tokens)
            rows.append({
                "beside": what, "tokens": len(prompt), "its time s": round(busy_s, 2), "one chunk s (slowest)": round(chunk_s, 3),
                "longest gap s": round(max(gaps), 3), "median gap s": round(statistics.median(gaps), 3),
                "longest gap / chunk": round(max(gaps) / chunk_s, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def _long_prompt(engine: Engine, tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(long_text(engine.config.cache_path(), 6 * tokens))[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the essays give only {len(ids)} tokens; ask for fewer --stall-prompt-tokens")
    return ids


def _slowest_chunk_seconds(engine: Engine, prompt: list[int]) -> float:
    """The last (slowest) chunk of the prompt's prefill, timed alone over the chunks before it."""
    model, step = engine.model, engine.config.prefill_chunk
    cut = (len(prompt) - 1) // step * step
    cache = model.new_cache(len(prompt))
    with torch.inference_mode():
        model.prefill(prompt[:cut], cache, step)
        times = []
        for _ in range(3):
            cache.truncate(cut)
            started = time.perf_counter()
            model.forward(torch.tensor(prompt[cut:]), torch.arange(cut, len(prompt)), cache)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * step / (len(prompt) - cut)


def _gaps_during(server: _Server, model: str, send: Callable[[], object], stream_tokens: int) -> tuple[list[float], float]:
    """Stream one answer; once it flows, `send` other work; the stream's token gaps while that work ran."""
    arrivals: list[float] = []
    flowing = threading.Event()

    def stream() -> None:
        for chunk in server.client.completions.create(model=model, prompt="Once upon a time", max_tokens=stream_tokens,
                                                      temperature=0.8, seed=1, stream=True):
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
                if len(arrivals) == 5:
                    flowing.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    flowing.wait(600)
    sent = time.perf_counter()
    send()
    answered = time.perf_counter()
    streamer.join()
    window = [t for t in arrivals if sent <= t <= answered]
    if len(window) < 2:
        raise SystemExit("the stream ended before the other work did; ask for more --stream-tokens")
    before = [t for t in arrivals if t < sent]
    gaps = [b - a for a, b in zip([before[-1], *window], window)]
    return gaps, answered - sent


def report(out_dir: Path, name: str, config: KvcakeConfig, args: argparse.Namespace, decode: dict | None, stall: dict | None) -> None:
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    record = {"settings": {"model": config.model, "dtype": dtype, "clients": args.clients, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
                           "max_batch": config.max_batch, "stall_prompt_tokens": args.stall_prompt_tokens, "machine": machine_description()},
              "decode": decode, "stall": stall}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    header = [f"Model `{config.model}` ({dtype}), store in memory. Machine: {machine_description()}.", ""]
    rows: list[dict] = []
    if decode is not None:
        header += [f"**Decode-heavy**: {args.clients} clients at once, each a short chat prompt and {args.decode_tokens} generated tokens, "
                   f"{args.rounds} rounds per server, the two servers taking turns. Batched / one at a time: "
                   f"**{decode['batched / one at a time']}x** output tokens/s.", ""]
        rows += [{"workload": "decode", **row} for row in decode["rows"]]
    if stall is not None:
        header += [f"**Prefill stall**: a client streams while another sends a {args.stall_prompt_tokens}-token prompt, then a warm call "
                   "of one document of the same tokens; the stream's longest gap between two tokens while each ran, against the "
                   "slowest prefill chunk timed alone in the same run.", ""]
        rows += [{"workload": "stall", **row} for row in stall["rows"]]
    write_report(out_dir / f"{name}.md", "Continuous batching", header, rows)
