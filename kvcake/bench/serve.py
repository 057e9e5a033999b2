"""`kvcake bench serve`: throughput and TTFT of the HTTP server under a mixed workload, per reuse strategy.

The workload: `--requests` chat requests sent by `--concurrency` clients at once (the
`openai` client, streaming, greedy). Half of them ask about one of `--documents` long
documents (their prefix is stored: hits); the other half carry a long text of their
own (misses). The store is in memory behind an emulated link whose bandwidth makes
loading one document's prefix take as long as computing it (balanced), times each of
`--factors`: below 1 the link is the bottleneck of load-only serving, above 1 compute is.

For each strategy (compute-only, load-only, Cake) the server starts on a fresh store,
the documents are stored by one untimed request each, and the workload runs; the
reports give requests per second and client-side TTFT (request sent to first streamed
token, queueing included) at p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from kvcake.bench.report import machine_description, write_report
from kvcake.config import KvcakeConfig, config_from_args
from kvcake.data import paul_graham_essays
from kvcake.engine import Engine, GenerateRequest
from kvcake.model import SamplingParams
from kvcake.server.background import BackgroundServer
from kvcake.store.bytestore import ByteStore
from kvcake.store.memory import MemoryBackend
from kvcake.store.throttle import ThrottledBackend

STRATEGIES = ("compute", "load", "cake")
LATENCY_S = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=32, help="Requests per strategy.")
    parser.add_argument("--concurrency", type=int, default=4, help="Clients sending at once.")
    parser.add_argument("--documents", type=int, default=4, help="Distinct long documents shared by the hits.")
    parser.add_argument("--document-chars", type=int, default=6000, help="Characters per document (about 4 per token).")
    parser.add_argument("--factors", default="0.5,1", help="Link bandwidths as multiples of the balanced one.")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default="serve", help="File stem of the report (e.g. serve-io0 for a run with --io-threads 0).")


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    texts = _texts(config, args)
    shared, own = texts[: args.documents], texts[args.documents :]
    rng = random.Random(args.seed)
    workload = [_messages(shared[i % len(shared)], i) if i % 2 == 0 else _messages(own[i // 2 % len(own)], i) for i in range(args.requests)]
    rng.shuffle(workload)
    balanced_gbps, compute_s = _balanced_link(config, shared[0])
    print(f"one document prefix computes in {compute_s:.2f}s; balanced link {balanced_gbps:.3f} Gbps", flush=True)
    cells = []
    for factor in (float(f) for f in args.factors.split(",")):
        results = {s: _run_strategy(config.replace(reuse=s), balanced_gbps * factor, shared, workload, args) for s in STRATEGIES}
        for strategy, result in results.items():
            print(f"{factor:g}x", strategy, json.dumps({k: v for k, v in result.items() if k != "ttft_s"}), flush=True)
        cells.append({"factor": factor, "link_gbps": balanced_gbps * factor, "results": results})
    record = {"settings": _settings(config, args, balanced_gbps, compute_s), "cells": cells}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    _report(args.out_dir / args.name, record)


def _texts(config: KvcakeConfig, args: argparse.Namespace) -> list[str]:
    essays = paul_graham_essays(config.cache_path())
    names = sorted(essays)
    needed = args.documents + args.requests // 2
    if needed > len(names):
        raise ValueError(f"the workload needs {needed} distinct texts; there are {len(names)} essays")
    return [essays[name][: args.document_chars] for name in names[:needed]]


def _messages(text: str, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text}\n\nQuestion {index}: what is one point the text above makes?"}]


def _balanced_link(config: KvcakeConfig, document: str) -> tuple[float, float]:
    """The bandwidth at which loading one document's stored prefix takes as long as computing it."""
    backend = MemoryBackend(8 << 30)
    engine = Engine(config.replace(reuse="compute"), store=ByteStore(backend))
    request = GenerateRequest(messages=_messages(document, 0), sampling=SamplingParams(max_tokens=1))
    engine.generate(request)
    engine.writeback.flush()
    compute_s = statistics.median(engine.generate(request).metrics.prefix.compute_s for _ in range(3))
    stored_bytes = engine.store.stats().bytes_written
    engine.close()
    return stored_bytes * 8 / compute_s / 1e9, compute_s


def _run_strategy(config: KvcakeConfig, gbps: float, shared: list[str], workload: list[list[dict]], args: argparse.Namespace) -> dict:
    engine = Engine(config, store=ByteStore(ThrottledBackend(MemoryBackend(8 << 30), gbps, LATENCY_S)))
    with BackgroundServer(engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        for index, document in enumerate(shared):
            _ask(client, config.model, _messages(document, -1 - index), args.answer_tokens)
        engine.writeback.flush()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            ttfts = list(pool.map(lambda messages: _ask(client, config.model, messages, args.answer_tokens), workload))
        elapsed = time.perf_counter() - started
    engine.close()
    ordered = sorted(ttfts)
    return {
        "requests": len(workload),
        "seconds": elapsed,
        "requests_per_s": len(workload) / elapsed,
        "ttft_p50_s": statistics.median(ordered),
        "ttft_p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "ttft_s": ttfts,
    }


def _ask(client: openai.OpenAI, model: str, messages: list[dict], answer_tokens: int) -> float:
    sent = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=answer_tokens, temperature=0, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - sent
    return first if first is not None else time.perf_counter() - sent


def _settings(config: KvcakeConfig, args: argparse.Namespace, balanced_gbps: float, compute_s: float) -> dict:
    return {
        "model": config.model, "dtype": config.dtype, "requests": args.requests, "concurrency": args.concurrency,
        "documents": args.documents, "document_chars": args.document_chars, "balanced_gbps": balanced_gbps,
        "document_compute_s": compute_s, "io_threads": config.io_threads, "machine": machine_description(),
    }


def _report(stem: Path, record: dict) -> None:
    settings = record["settings"]
    rows = []
    for cell in record["cells"]:
        results = cell["results"]
        best_baseline = max(results["compute"]["requests_per_s"], results["load"]["requests_per_s"])
        rows += [
            {"link": f"{cell['link_gbps']:.3f} Gbps ({cell['factor']:g}x)", "reuse": name, "requests/s": r["requests_per_s"],
             "vs best baseline": r["requests_per_s"] / best_baseline, "TTFT p50 s": r["ttft_p50_s"], "TTFT p99 s": r["ttft_p99_s"],
             "wall s": r["seconds"]}
            for name, r in results.items()
        ]
    header = [
        f"Model `{settings['model']}`, {settings['requests']} chat requests from {settings['concurrency']} concurrent clients; "
        f"half ask about one of {settings['documents']} stored documents of {settings['document_chars']} characters, half bring "
        f"their own. Store in memory behind an emulated link; 1x is {settings['balanced_gbps']:.3f} Gbps, the bandwidth at which "
        f"a document loads as fast as it computes ({settings['document_compute_s']:.2f} s). I/O threads: {settings['io_threads']} "
        f"({'waiting requests preload their stored prefix' if settings['io_threads'] else 'each request loads its own prefix when it runs, as in the papers'}). "
        f"Machine: {settings['machine']}.",
        "",
        "TTFT is measured by the client, from sending the request to the first streamed token (queueing included).",
    ]
    write_report(stem.with_suffix(".md"), "Serving throughput by reuse strategy", header, rows)
    _plot(stem.with_suffix(".png"), record["cells"])


def _plot(path: Path, cells: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(STRATEGIES)
    for offset, strategy in enumerate(STRATEGIES):
        xs = [i + (offset - 1) * width for i in range(len(cells))]
        throughput.bar(xs, [c["results"][strategy]["requests_per_s"] for c in cells], width, label=strategy)
        latency.bar(xs, [c["results"][strategy]["ttft_p99_s"] for c in cells], width, label=strategy)
    labels = [f"{c['factor']:g}x link" for c in cells]
    for axis, title, unit in ((throughput, "throughput", "requests / s"), (latency, "client-side TTFT p99", "seconds")):
        axis.set_xticks(range(len(cells)), labels)
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
