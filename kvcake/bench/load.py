"""`kvcake bench load`: TTFT of a `reuse=load` request against its floor, per store, in one run.

A prompt whose whole prefix is stored (chunks x chunk_size tokens, one new token after
it) can do no better than copying the bytes it loads once and running one forward of
the last token at that context length. Both parts of that floor are measured here, in
the same process and run: a single-threaded memcpy of the loaded bytes (cycling
buffers, so it reads memory), and the forward of the last token over a cache of the
prefix. The report gives floor / TTFT (1 = at the machine's limit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvcake.bench.report import machine_description, write_report
from kvcake.config import config_from_args
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.model import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=24, help="Stored prefix chunks (of chunk_size tokens).")
    parser.add_argument("--repeats", type=int, default=9, help="Rounds of one timed request per store (medians reported).")
    parser.add_argument("--stores", default="memory,file", help="Stores to measure: memory, file.")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/load.md"), help="Markdown report path (JSON beside it).")


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    names = [s.strip() for s in args.stores.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-load-") as tmp:
        urls = {"memory": "memory://?max_gb=8", "file": f"file://{tmp}/kv"}
        engines = {name: Engine(config.replace(store_url=urls[name])) for name in names}
        try:
            rows = _measure(engines, args.chunks, args.repeats)
            dtype = str(engines[names[0]].model.dtype).removeprefix("torch.")
        finally:
            for engine in engines.values():
                engine.close()
    for row in rows:
        print(row)
    header = [
        f"Model `{config.model}` ({dtype}), {args.chunks} stored chunks of {config.chunk_size} tokens + 1 new token; "
        f"{args.repeats} rounds, each timing one request per store and the floor's two parts, medians reported "
        f"(floor / TTFT is the median of the rounds' ratios). Machine: {machine_description()}, {torch.get_num_threads()} threads.",
        "floor = memcpy of the loaded bytes + the last token's forward at this context, both measured in the same round.",
    ]
    write_report(args.out, "Load-only TTFT against its floor", header, rows)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def _measure(engines: dict[str, Engine], chunks: int, repeats: int) -> list[dict]:
    """Rounds of one request per store plus the floor's parts, so the machine's drift hits every column alike."""
    any_engine = next(iter(engines.values()))
    chunk_size = any_engine.config.chunk_size
    prompt = any_engine.tokenizer.encode(long_text(any_engine.config.cache_path(), 8 * chunk_size * (chunks + 1)))[: chunks * chunk_size + 1]
    if len(prompt) != chunks * chunk_size + 1:
        raise SystemExit(f"the essays give only {len(prompt)} tokens; ask for fewer --chunks")

    def request(reuse: str) -> GenerateRequest:
        return GenerateRequest(token_ids=prompt, reuse=reuse, sampling=SamplingParams(max_tokens=1))

    for engine in engines.values():
        engine.generate(request("compute"))
        engine.flush()
    samples: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in engines}
    last_token = _LastToken(any_engine, prompt)
    for _ in range(repeats):
        for name, engine in engines.items():
            result = engine.generate(request("load"))
            if result.metrics.prefix.chunks_loaded != chunks:
                raise SystemExit("not every chunk was loaded; the numbers would be meaningless")
            nbytes = result.metrics.prefix.bytes_loaded
            samples[name].append((result.metrics.ttft_s, _memcpy_seconds(nbytes), last_token.seconds(), nbytes))
    return [_row(name, rounds) for name, rounds in samples.items()]


def _row(store: str, rounds: list[tuple[float, float, float, int]]) -> dict:
    ttft, copy_s, step_s = (statistics.median(r[i] for r in rounds) for i in range(3))
    nbytes = rounds[0][3]
    return {
        "store": store, "loaded MB": round(nbytes / 1e6, 1), "TTFT ms": round(ttft * 1e3, 1),
        "memcpy ms": round(copy_s * 1e3, 1), "last-token forward ms": round(step_s * 1e3, 1),
        "floor / TTFT": round(statistics.median((c + s) / t for t, c, s, _ in rounds), 3),
        "load GB/s": round(nbytes / max(ttft - step_s, 1e-9) / 1e9, 2),
    }


def _memcpy_seconds(nbytes: int) -> float:
    """One single-threaded copy of `nbytes` from memory just written (not from a warm cache) into a buffer."""
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.empty(nbytes, dtype=np.uint8)
    np.copyto(target, source)  # fault the pages in, untimed
    source[:] = 2
    started = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - started


class _LastToken:
    """The forward of the prompt's last token over a cache of the rest: the other part of the floor."""

    def __init__(self, engine: Engine, prompt: list[int]) -> None:
        self.model = engine.model
        self.prompt = prompt
        self.cache = self.model.new_cache(len(prompt))
        with torch.inference_mode():
            self.model.prefill(prompt[:-1], self.cache, engine.config.chunk_size)

    def seconds(self) -> float:
        with torch.inference_mode():
            self.cache.truncate(len(self.prompt) - 1)
            started = time.perf_counter()
            self.model.forward(torch.tensor([self.prompt[-1]]), torch.tensor([len(self.prompt) - 1]), self.cache)
            return time.perf_counter() - started
