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
from kvcake.engine import Engine, GenerateRequest
from kvcake.model import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=24, help="Stored prefix chunks (of chunk_size tokens).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed requests per store (median reported).")
    parser.add_argument("--stores", default="memory,file", help="Stores to measure: memory, file.")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/load.md"), help="Markdown report path (JSON beside it).")


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-load-") as tmp:
        urls = {"memory": "memory://?max_gb=8", "file": f"file://{tmp}/kv"}
        for name in (s.strip() for s in args.stores.split(",") if s.strip()):
            engine = Engine(config.replace(store_url=urls[name]))
            try:
                rows.append(_measure(engine, name, args.chunks, args.repeats))
            finally:
                engine.close()
            print(rows[-1])
    header = [
        f"Model `{config.model}`, {args.chunks} stored chunks of {config.chunk_size} tokens + 1 new token; "
        f"median of {args.repeats} requests per store. Machine: {machine_description()}, {torch.get_num_threads()} threads.",
        "floor = memcpy of the loaded bytes + the last token's forward at this context, both measured in this run.",
    ]
    write_report(args.out, "Load-only TTFT against its floor", header, rows)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def _measure(engine: Engine, store: str, chunks: int, repeats: int) -> dict:
    chunk_size = engine.config.chunk_size
    prompt = engine.tokenizer.encode(long_text(engine.config.cache_path(), 8 * chunk_size * (chunks + 1)))[: chunks * chunk_size + 1]
    if len(prompt) != chunks * chunk_size + 1:
        raise SystemExit(f"the essays give only {len(prompt)} tokens; ask for fewer --chunks")

    def request(reuse: str) -> GenerateRequest:
        return GenerateRequest(token_ids=prompt, reuse=reuse, sampling=SamplingParams(max_tokens=1))

    engine.generate(request("compute"))
    engine.writeback.flush()
    results = [engine.generate(request("load")) for _ in range(repeats)]
    if any(r.metrics.prefix.chunks_loaded != chunks for r in results):
        raise SystemExit("not every chunk was loaded; the numbers would be meaningless")
    ttft = statistics.median(r.metrics.ttft_s for r in results)
    nbytes = results[0].metrics.prefix.bytes_loaded
    copy_s = _memcpy_seconds(nbytes, repeats)
    step_s = _last_token_seconds(engine, prompt, repeats)
    floor = copy_s + step_s
    return {
        "store": store, "loaded MB": round(nbytes / 1e6, 1), "TTFT ms": round(ttft * 1e3, 1),
        "memcpy ms": round(copy_s * 1e3, 1), "last-token forward ms": round(step_s * 1e3, 1),
        "floor / TTFT": round(floor / ttft, 3), "load GB/s": round(nbytes / max(ttft - step_s, 1e-9) / 1e9, 2),
    }


def _memcpy_seconds(nbytes: int, repeats: int) -> float:
    sources = [np.ones(nbytes, dtype=np.uint8) for _ in range(2)]
    target = np.empty(nbytes, dtype=np.uint8)
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        np.copyto(target, sources[index % 2])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _last_token_seconds(engine: Engine, prompt: list[int], repeats: int) -> float:
    model = engine.model
    cache = model.new_cache(len(prompt))
    times = []
    with torch.inference_mode():
        model.prefill(prompt[:-1], cache, engine.config.chunk_size)
        for _ in range(repeats):
            cache.truncate(len(prompt) - 1)
            started = time.perf_counter()
            model.forward(torch.tensor([prompt[-1]]), torch.tensor([len(prompt) - 1]), cache)
            times.append(time.perf_counter() - started)
    return statistics.median(times)
