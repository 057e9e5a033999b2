"""`kvcake bench cake`: TTFT of compute, load, Cake and the best static split over a bandwidth grid.

For each prefix length the prefix is computed once and stored in memory; the store is
then read through the throttle (an emulated link of X Gbps, as the papers do). The
bandwidths are chosen from this run's measured compute speed: `balanced` is the one at
which loading the prefix takes as long as computing it, and the grid multiplies it by
`--factors`, so the grid spans I/O-bound (low), balanced and compute-bound (high) cells
on any machine.

The oracle is the best `split:m`, measured. A split's time is max(compute of chunks < m,
load of chunks >= m); from this run's per-chunk compute times and per-chunk load time
the bench predicts the best m, then measures m-1, m, m+1 (plus m = 0 and m = n, which are
load and compute) and keeps the fastest median. Every method runs `--repeats` times,
interleaved, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from kvcake.bench.report import machine_description, write_report
from kvcake.config import KvcakeConfig, config_from_args
from kvcake.data import long_text
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.model import SamplingParams
from kvcake.store import prefix_chunk_keys
from kvcake.store.bytestore import ByteStore
from kvcake.store.memory import MemoryBackend
from kvcake.store.throttle import ThrottledBackend

QUERY = "\n\nQuestion: what is the main point of the text above? Answer in one sentence."
LATENCY_S = 1e-4
METHODS = ("compute", "load", "cake", "oracle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="2048,4096,7936", help="Prefix lengths in tokens (multiples of the chunk size).")
    parser.add_argument("--factors", default="0.25,0.5,1,2,4", help="Bandwidths as multiples of the balanced bandwidth.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per method and cell (median reported).")
    parser.add_argument("--contention", action="store_true", help="Run with a background thread doing matrix products.")
    parser.add_argument("--json", type=Path, default=None, help="Records file (default docs/benchmarks/cake[-contention].json).")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"), help="Where the markdown report and plot go.")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="Keep the records file's cells of other lengths and replace those of the lengths run now.",
    )


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args).replace(reuse="cake")
    name = "cake-contention" if args.contention else "cake"
    lengths = [int(x) for x in args.lengths.split(",")]
    json_path = args.json or args.out_dir / f"{name}.json"
    records: list[dict] = []
    if args.merge and json_path.is_file():
        records = [r for r in json.loads(json_path.read_text()) if r["context_tokens"] not in lengths]
    with _background_compute(args.contention):
        for length in lengths:
            records.extend(_bench_length(config, length, [float(f) for f in args.factors.split(",")], args.repeats))
    records.sort(key=lambda r: (r["context_tokens"], r["bandwidth_gbps"]))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=2))
    _report(args.out_dir, name, config, records, args)


class SharedBackend:
    """One in-memory backend seen by several engines in turn: closing an engine (which drops an in-memory
    store's entries, as its owner ends) leaves the entries for the next engine; `release` drops them."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)

    def close(self) -> None:
        """Kept open for the next engine."""

    def release(self) -> None:
        self._backend.close()


def _bench_length(config: KvcakeConfig, length: int, factors: list[float], repeats: int) -> list[dict]:
    if length % config.chunk_size:
        raise ValueError(f"prefix length {length} is not a multiple of the chunk size {config.chunk_size}")
    backend = SharedBackend(MemoryBackend(64 << 30))
    engine = Engine(config, store=ByteStore(backend))
    prompt = _prompt(engine, config, length)
    num_chunks = length // config.chunk_size
    chunk_compute_s = _per_chunk_compute_times(engine, prompt, num_chunks)
    _ttft(engine, prompt, "compute")
    engine.flush()
    keys = prefix_chunk_keys(engine.fingerprint, config.tenant, prompt, config.chunk_size)[:num_chunks]
    engine.close()
    prefix_bytes = sum(len(backend.read_all(key) or b"") for key in keys)
    balanced_gbps = prefix_bytes * 8 / sum(chunk_compute_s) / 1e9
    print(f"[{length} tokens] {num_chunks} chunks, {prefix_bytes / 1e6:.0f} MB, compute {sum(chunk_compute_s):.2f}s, "
          f"balanced bandwidth {balanced_gbps:.3f} Gbps", flush=True)
    records = []
    for factor in factors:
        gbps = balanced_gbps * factor
        engine = Engine(config, store=ByteStore(ThrottledBackend(backend, gbps, LATENCY_S)))
        load_per_chunk = LATENCY_S + prefix_bytes / num_chunks * 8 / (gbps * 1e9)
        splits = _oracle_candidates(chunk_compute_s, load_per_chunk)
        methods = ["compute", "load", "cake", *(f"split:{m}" for m in splits)]
        medians, meet = _measure(engine, prompt, methods, repeats)
        engine.close()
        best_split = min(["compute", "load", *(f"split:{m}" for m in splits)], key=lambda method: medians[method])
        record = {
            "context_tokens": length,
            "bandwidth_gbps": round(gbps, 5),
            "bandwidth_factor": factor,
            "ttft_s": {"compute": medians["compute"], "load": medians["load"], "cake": medians["cake"], "oracle": medians[best_split]},
            "meet_chunk": meet,
            "oracle_split": best_split,
            "num_chunks": num_chunks,
            "repeats": repeats,
        }
        print(json.dumps(record), flush=True)
        records.append(record)
    backend.release()
    return records


def _prompt(engine: Engine, config: KvcakeConfig, length: int) -> list[int]:
    prefix = engine.tokenizer.encode(long_text(config.cache_path(), length * 6))[:length]
    if len(prefix) < length:
        raise ValueError(f"only {len(prefix)} tokens of text for a {length}-token prefix")
    return prefix + engine.tokenizer.encode(QUERY)


def _per_chunk_compute_times(engine: Engine, prompt: list[int], num_chunks: int, passes: int = 3) -> list[float]:
    """Each prefix chunk's compute time over the chunks before it: the median of `passes` passes."""
    model, chunk_size = engine.model, engine.config.chunk_size
    ids = torch.tensor(prompt)
    samples: list[list[float]] = [[] for _ in range(num_chunks)]
    with torch.inference_mode():
        for _ in range(passes):
            cache = model.new_cache(len(prompt))
            for index in range(num_chunks):
                positions = torch.arange(index * chunk_size, (index + 1) * chunk_size)
                started = time.perf_counter()
                model.forward(ids[positions], positions, cache, keep_kv=True, rotated_keys=True)
                samples[index].append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def _oracle_candidates(chunk_compute_s: list[float], load_per_chunk_s: float) -> list[int]:
    """Splits m around the predicted best, where computing chunks < m takes as long as loading the rest."""
    num_chunks = len(chunk_compute_s)
    cumulative = [sum(chunk_compute_s[:m]) for m in range(num_chunks + 1)]
    predicted = min(range(num_chunks + 1), key=lambda m: max(cumulative[m], (num_chunks - m) * load_per_chunk_s))
    return sorted({m for m in (predicted - 1, predicted, predicted + 1) if 0 < m < num_chunks})


def _ttft(engine: Engine, prompt: list[int], reuse: str) -> tuple[float, int | None]:
    result = engine.generate(GenerateRequest(token_ids=prompt, reuse=reuse, sampling=SamplingParams(max_tokens=1)))
    return result.metrics.ttft_s, result.metrics.prefix.meet_chunk


def _measure(engine: Engine, prompt: list[int], methods: list[str], repeats: int) -> tuple[dict[str, float], int | None]:
    times: dict[str, list[float]] = {method: [] for method in methods}
    meets: list[int] = []
    _ttft(engine, prompt, "cake")
    for _ in range(repeats):
        for method in methods:
            ttft, meet = _ttft(engine, prompt, method)
            times[method].append(ttft)
            if method == "cake" and meet is not None:
                meets.append(meet)
    return {method: statistics.median(values) for method, values in times.items()}, int(statistics.median(meets)) if meets else None


@contextmanager
def _background_compute(enabled: bool) -> Iterator[None]:
    """A thread multiplying matrices for as long as the block runs: compute shared with other work."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def churn() -> None:
        a = torch.randn(384, 384)
        while not stop.is_set():
            a = torch.tanh(a @ a)

    thread = threading.Thread(target=churn, name="kvcake-bench-contention", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _report(out_dir: Path, name: str, config: KvcakeConfig, records: list[dict], args: argparse.Namespace) -> None:
    rows = []
    for record in records:
        ttft = record["ttft_s"]
        rows.append({
            "tokens": record["context_tokens"],
            "Gbps": record["bandwidth_gbps"],
            "x balanced": record["bandwidth_factor"],
            **{f"{m} s": ttft[m] for m in METHODS},
            "cake / oracle": ttft["cake"] / ttft["oracle"],
            "cake / min(compute, load)": ttft["cake"] / min(ttft["compute"], ttft["load"]),
            "meet": f"{record['meet_chunk']}/{record['num_chunks']}",
            "oracle": record["oracle_split"],
            "runs": record.get("repeats", args.repeats),
        })
    summary = _summary(records)
    header = [
        f"Model `{config.model}`, chunk {config.chunk_size} tokens, store in memory behind the throttle "
        f"({LATENCY_S * 1e3:g} ms latency), {torch.get_num_threads()} threads, median of "
        f"{'/'.join(str(n) for n in sorted({r.get('repeats', args.repeats) for r in records}))} interleaved runs per cell (column `runs`)"
        + (", with a background thread doing matrix products on the cores" if args.contention else "") + ".",
        f"Machine: {machine_description()}.",
        "",
        *summary,
        "",
        f"![TTFT vs bandwidth]({name}.png)",
    ]
    write_report(out_dir / f"{name}.md", "Cake: compute from the front, load from the back", header, rows)
    _plot(out_dir / f"{name}.png", records)


def _summary(records: list[dict]) -> list[str]:
    ttfts = [r["ttft_s"] for r in records]
    vs_compute = statistics.mean(t["compute"] / t["cake"] for t in ttfts)
    vs_load = statistics.mean(t["load"] / t["cake"] for t in ttfts)
    worst_oracle = max(t["cake"] / t["oracle"] for t in ttfts)
    balanced = [r["ttft_s"] for r in records if r["bandwidth_factor"] == 1]
    lines = [
        f"- Mean TTFT reduction of Cake: {vs_compute:.2f}x vs compute-only, {vs_load:.2f}x vs load-only "
        "(the Cake paper reports 2.6x on average against each, on 7B-70B models and GPUs).",
        f"- Worst cell, Cake / oracle: {worst_oracle:.3f} (target <= 1.10).",
    ]
    close = [t for t in ttfts if max(t["compute"], t["load"]) / min(t["compute"], t["load"]) < 4]
    beaten = sum(t["cake"] < min(t["compute"], t["load"]) for t in close)
    lines.append(f"- Cells where compute and load differ by less than 4x: Cake beats both in {beaten} of {len(close)}.")
    if balanced:
        worst_balanced = max(t["cake"] / min(t["compute"], t["load"]) for t in balanced)
        lines.append(f"- At the balanced bandwidth, Cake / min(compute, load) is at most {worst_balanced:.3f} (target <= 0.60).")
    return lines


def _plot(path: Path, records: list[dict]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["context_tokens"] for r in records})
    figure, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        cells = sorted((r for r in records if r["context_tokens"] == length), key=lambda r: r["bandwidth_gbps"])
        bandwidths = [r["bandwidth_gbps"] for r in cells]
        for method, style in zip(METHODS, ("o-", "s-", "^-", "k--")):
            axis.plot(bandwidths, [r["ttft_s"][method] for r in cells], style, label=method)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticks(bandwidths, [f"{b:.3g}" for b in bandwidths])
        axis.set_xlabel("storage bandwidth (Gbps)")
        axis.set_ylabel("TTFT (s)")
        axis.set_title(f"{length}-token prefix")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
