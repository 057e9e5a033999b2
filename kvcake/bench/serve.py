"""`kvcake bench serve`: throughput and TTFT of the HTTP server under a mixed workload, per reuse strategy.

The workload: `--requests` chat requests sent by `--concurrency` clients at once (the
`openai` client, streaming, greedy). Half of them ask about one of `--documents` long
documents (their prefix is stored: hits); the other half carry a text of their own,
as long (misses). The store is in memory behind an emulated link whose bandwidth makes
loading one document's prefix take as long as computing it (balanced), times each of
`--factors`: below 1 the link is the bottleneck of load-only serving, above 1 compute is.

Each strategy (compute-only, load-only, Cake) gets its own server and store, and the
documents are stored by one untimed request each. The workload is then cut into rounds
of `--round-requests`, and the strategies take turns round by round (in a rotating
order), so that a drift of the machine's speed during the run weighs on all of them
alike. The reports give requests per second over all rounds and client-side TTFT
(request sent to first streamed token, queueing included) at p50 and p99.

`--workload decode` and `--workload stall` measure continuous batching instead (see
`kvcake/bench/batching.py`); `--workload batching` runs both into one report.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import openai
from tqdm import tqdm

from kvcake.bench import batching
from kvcake.bench.report import machine_description, write_report
from kvcake.config import KvcakeConfig, config_from_args
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.runtime import release_freed_memory
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
    parser.add_argument("--document-chars", type=int, default=12000, help="Characters per document and per miss's own text (about 4 per token).")
    parser.add_argument("--factors", default="0.5,1", help="Link bandwidths as multiples of the balanced one.")
    parser.add_argument("--round-requests", type=int, default=8, help="Requests per round; the strategies take turns round by round.")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default=None, help="File stem of the report (default: serve, or serve-batching for the batching workloads).")
    parser.add_argument("--workload", choices=("mixed", "decode", "stall", "batching"), default="mixed",
                        help="mixed: half stored-prefix hits, per reuse strategy; decode: many clients generating, batched vs one at a time; "
                             "stall: a client's token gaps while another's long prompt prefills; batching: decode and stall.")
    parser.add_argument("--clients", type=int, default=8, help="decode: clients at once.")
    parser.add_argument("--decode-tokens", type=int, default=128, help="decode: tokens each client generates.")
    parser.add_argument("--rounds", type=int, default=3, help="decode: rounds per server.")
    parser.add_argument("--stall-prompt-tokens", type=int, default=8000, help="stall: tokens of the long prompt.")
    parser.add_argument("--stream-tokens", type=int, default=2000, help="stall: tokens the streaming client asks for (enough to outlast the prefill).")


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    if args.workload != "mixed":
        decode = batching.run_decode(config, args) if args.workload in ("decode", "batching") else None
        stall = batching.run_stall(config, args) if args.workload in ("stall", "batching") else None
        batching.report(args.out_dir, args.name or "serve-batching", config, args, decode, stall)
        return
    args.name = args.name or "serve"
    texts = _texts(config, args)
    shared, own = texts[: args.documents], texts[args.documents :]
    rng = random.Random(args.seed)
    workload = [_messages(shared[i % len(shared)], i) if i % 2 == 0 else _messages(own[i // 2 % len(own)], i) for i in range(args.requests)]
    rng.shuffle(workload)
    balanced_gbps, compute_s = _balanced_link(config, shared[0])
    print(f"one document prefix computes in {compute_s:.2f}s; balanced link {balanced_gbps:.3f} Gbps", flush=True)
    cells = []
    for factor in (float(f) for f in args.factors.split(",")):
        results = _run_cell(config, balanced_gbps * factor, shared, workload, args)
        gc.collect()
        release_freed_memory()
        for strategy, result in results.items():
            print(f"{factor:g}x", strategy, json.dumps({k: v for k, v in result.items() if k != "ttft_s"}), flush=True)
        cells.append({"factor": factor, "link_gbps": balanced_gbps * factor, "results": results})
    record = {"settings": _settings(config, args, balanced_gbps, compute_s), "cells": cells}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    _report(args.out_dir / args.name, record)


def _texts(config: KvcakeConfig, args: argparse.Namespace) -> list[str]:
    """Distinct texts of exactly `--document-chars` each, cut one after another from the joined essays.

    Hits and misses then carry prompts of the same length, so the three strategies face
    the same amount of work per request.
    """
    needed = args.documents + args.requests // 2
    corpus = long_text(config.cache_path(), needed * args.document_chars)
    if len(corpus) < needed * args.document_chars:
        raise ValueError(f"the workload needs {needed} texts of {args.document_chars} characters; the essays hold {len(corpus)}")
    return [corpus[i * args.document_chars : (i + 1) * args.document_chars] for i in range(needed)]


def _messages(text: str, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text}\n\nQuestion {index}: what is one point the text above makes?"}]


def _balanced_link(config: KvcakeConfig, document: str) -> tuple[float, float]:
    """The bandwidth at which loading one document's stored prefix takes as long as computing it."""
    backend = MemoryBackend(8 << 30)
    engine = Engine(config.replace(reuse="compute"), store=ByteStore(backend))
    request = GenerateRequest(messages=_messages(document, 0), sampling=SamplingParams(max_tokens=1))
    engine.generate(request)
    engine.flush()
    compute_s = statistics.median(engine.generate(request).metrics.prefix.compute_s for _ in range(3))
    stored_bytes = engine.store.stats().bytes_written
    engine.close()
    return stored_bytes * 8 / compute_s / 1e9, compute_s


class _StrategyServer:
    """One strategy's engine, store and live server, with the shared documents stored."""

    def __init__(self, config: KvcakeConfig, gbps: float, shared: list[str], answer_tokens: int):
        self.engine = Engine(config, store=ByteStore(ThrottledBackend(MemoryBackend(8 << 30), gbps, LATENCY_S)))
        self.server = BackgroundServer(self.engine)
        self.answer_tokens = answer_tokens
        self.shared = shared
        self.seconds = 0.0
        self.ttfts: list[float] = []

    def __enter__(self) -> _StrategyServer:
        """Start the server and store the documents; on any failure the server and engine are closed."""
        with ExitStack() as opened:
            opened.callback(self.engine.close)
            opened.enter_context(self.server)
            self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
            for index, document in enumerate(self.shared):
                self.ask(_messages(document, -1 - index))
            self.engine.flush()
            self._opened = opened.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._opened.close()

    def ask(self, messages: list[dict]) -> float:
        return _ask(self.client, self.engine.config.model, messages, self.answer_tokens)

    def run_round(self, batch: list[list[dict]], concurrency: int) -> None:
        """Send `batch` from `concurrency` clients; wait until its write-backs are done, untimed."""
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            self.ttfts += pool.map(self.ask, batch)
        self.seconds += time.perf_counter() - started
        self.engine.flush()

    def result(self) -> dict:
        ordered = sorted(self.ttfts)
        return {
            "requests": len(self.ttfts),
            "seconds": self.seconds,
            "requests_per_s": len(self.ttfts) / self.seconds,
            "ttft_p50_s": statistics.median(ordered),
            "ttft_p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "ttft_s": self.ttfts,
        }


def _run_cell(config: KvcakeConfig, gbps: float, shared: list[str], workload: list[list[dict]], args: argparse.Namespace) -> dict[str, dict]:
    """Every strategy on the same rounds of the workload, taking turns in a rotating order."""
    rounds = [workload[start : start + args.round_requests] for start in range(0, len(workload), args.round_requests)]
    with ExitStack() as stack:
        servers = {s: stack.enter_context(_StrategyServer(config.replace(reuse=s), gbps, shared, args.answer_tokens)) for s in STRATEGIES}
        for index, batch in enumerate(tqdm(rounds, desc=f"rounds at {gbps:.3f} Gbps", unit="round")):
            shift = index % len(STRATEGIES)
            for strategy in STRATEGIES[shift:] + STRATEGIES[:shift]:
                servers[strategy].run_round(batch, args.concurrency)
        return {strategy: server.result() for strategy, server in servers.items()}


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
        "documents": args.documents, "document_chars": args.document_chars, "round_requests": args.round_requests,
        "balanced_gbps": balanced_gbps,
        "document_compute_s": compute_s, "io_threads": config.io_threads, "max_batch": config.max_batch, "machine": machine_description(),
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
        (f"Model `{settings['model']}`, {settings['requests']} chat requests from {settings['concurrency']} concurrent clients; "
        f"half ask about one of {settings['documents']} stored documents of {settings['document_chars']} characters, half bring "
        f"their own of the same length. Store in memory behind an emulated link; 1x is {settings['balanced_gbps']:.3f} Gbps, the bandwidth at which "
        f"a document loads as fast as it computes ({settings['document_compute_s']:.2f} s). I/O threads: {settings['io_threads']} "
        f"({'waiting requests preload their stored prefix' if settings['io_threads'] else 'each request loads its own prefix when it runs, as in the papers'}). "
        f"Continuous batching: up to {settings.get('max_batch', 1)} requests at once. Machine: {settings['machine']}."),
        "",
        (f"The strategies take turns in rounds of {settings['round_requests']} requests (rotating order), so drift of the machine's speed "
        "weighs on all alike; requests/s is over all of a strategy's rounds."),
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
