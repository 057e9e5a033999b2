"""`kvcake bench tune`: TTFT of full prefill, blend and CacheTune at ~4k tokens, per store.

The prompt is one question of the default QA set (Disfl-QA) over its gold passage and distractors (as in
`kvcake eval blend`). For each store (memory, local disk, memory behind emulated links
of 10 and 1 Gbps) the documents are warmed in both layouts, then full prefill (blend at
r = 1), blend at `--ratio` and tune with its automatic ratio run `--repeats` times,
interleaved, after one untimed round that teaches tune its costs on this store. The
report gives median TTFTs, speedups over full prefill, and the ratio tune chose.

Then the automatic ratio's response to the machine: the ratio tune settles on with the
store in memory, behind a link on which loading a token's KV costs what computing it
does, and on that link while another process keeps the cores busy. It should rise with
the slower store and fall with the busier compute (a measurement, not a test: it
depends on the machine's speed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kvcake.bench.blend_eval import SYSTEM, build_items
from kvcake.bench.report import machine_description, write_report
from kvcake.config import config_from_args
from kvcake.data import DEFAULT_TASK, TASKS
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.model import SamplingParams
from kvcake.store import open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="Target prompt length in tokens.")
    parser.add_argument("--ratio", type=float, default=0.15, help="Blend's recompute ratio (tune picks its own).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per method and store (median reported).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the question and its distractors.")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-tune-") as disk:
        stores = {
            "memory": "memory://?max_gb=8",
            "local disk": f"file://{disk}?max_gb=8",
            "10 Gbps link": "memory://?max_gb=8&throttle_gbps=10&latency_ms=0.1",
            "1 Gbps link": "memory://?max_gb=8&throttle_gbps=1&latency_ms=0.1",
        }
        cells = [_bench_store(config, name, url, args) for name, url in stores.items()]
    record = {"settings": {"model": config.model, "dtype": config.dtype, "ratio": args.ratio, "repeats": args.repeats,
                           "machine": machine_description()}, "cells": cells, "auto_ratio": _auto_ratio(config, args)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "tune.json").write_text(json.dumps(record, indent=2))
    _report(args.out_dir, record)


def _bench_store(config, name: str, url: str, args: argparse.Namespace) -> dict:
    engine = Engine(config, store=open_store(url))
    item_args = argparse.Namespace(questions=1, prompt_tokens=args.prompt_tokens, per_passage=1, seed=args.seed)
    [item], _ = build_items(engine, TASKS[DEFAULT_TASK](config.cache_path()), item_args)
    engine.warm(list(item.documents), reuse="blend", system=SYSTEM)
    engine.warm(list(item.documents), reuse="tune", system=SYSTEM)
    methods = {"full": ("blend", 1.0), f"blend r={args.ratio:.2f}": ("blend", args.ratio), "tune auto": ("tune", None)}
    for reuse, ratio in methods.values():
        _ttft(engine, item, reuse, ratio)
    runs: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method, (reuse, ratio) in methods.items():
            runs[method].append(_ttft(engine, item, reuse, ratio))
    engine.close()
    medians = {method: sorted(samples)[len(samples) // 2] for method, samples in runs.items()}
    cell = {"store": name, "url": url, "ttft_s": {m: t for m, (t, _) in medians.items()}, "tune_ratio": medians["tune auto"][1]}
    print(json.dumps(cell), flush=True)
    return cell


BUSY_LOOP = "import torch\na = torch.randn(768, 768)\nwhile True:\n    a = torch.tanh(a @ a)"


def _auto_ratio(config, args: argparse.Namespace) -> dict:
    """The ratio tune settles on with a fast store, a store as slow per token as compute, and that store with busy cores."""
    base = config.replace(reuse="tune")
    fast = Engine(base.replace(store_url="memory://"))
    fast_ratio = _settled_ratio(fast, args)
    compute_s_per_token = fast.strategies["tune"].profile.compute_s_per_token
    model = fast.model.config
    row_bytes = model.num_layers * 2 * model.num_kv_heads * model.head_dim * fast.model.dtype.itemsize
    fast.close()
    slow = Engine(base.replace(store_url=f"memory://?throttle_gbps={row_bytes * 8 / compute_s_per_token / 1e9:.6f}"))
    slow_ratio = _settled_ratio(slow, args)
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        busy_ratio = _settled_ratio(slow, args)
    finally:
        competitor.kill()
        competitor.wait()
    slow.close()
    ratios = {"memory": fast_ratio, "balanced link": slow_ratio, "balanced link, busy cores": busy_ratio}
    print(json.dumps({"auto_ratio": ratios}), flush=True)
    return ratios


def _settled_ratio(engine: Engine, args: argparse.Namespace, requests: int = 4) -> float:
    item_args = argparse.Namespace(questions=1, prompt_tokens=args.prompt_tokens, per_passage=1, seed=args.seed)
    [item], _ = build_items(engine, TASKS[DEFAULT_TASK](engine.config.cache_path()), item_args)
    engine.warm(list(item.documents), reuse="tune", system=SYSTEM)
    for _ in range(requests):
        _ttft(engine, item, "tune", None)
    return engine.strategies["tune"].ratio()


def _ttft(engine: Engine, item, reuse: str, ratio: float | None) -> tuple[float, float]:
    request = GenerateRequest(query=f"Question: {item.question}", documents=list(item.documents), system=SYSTEM, reuse=reuse,
                              ratio=ratio, sampling=SamplingParams(max_tokens=1))
    metrics = engine.generate(request).metrics
    return metrics.ttft_s, metrics.documents.ratio


def _report(out_dir: Path, record: dict) -> None:
    settings = record["settings"]
    rows = []
    for cell in record["cells"]:
        ttft = cell["ttft_s"]
        blend_name = next(m for m in ttft if m.startswith("blend"))
        rows.append({
            "store": cell["store"], "full s": ttft["full"], f"{blend_name} s": ttft[blend_name], "tune s": ttft["tune auto"],
            "tune ratio": cell["tune_ratio"], "tune / blend": ttft["tune auto"] / ttft[blend_name],
            "full / tune": ttft["full"] / ttft["tune auto"],
        })
    header = [
        f"Model `{settings['model']}` ({settings['dtype']}), median of {settings['repeats']} interleaved runs after one "
        f"untimed round; blend at r = {settings['ratio']}, tune with its automatic ratio. Machine: {settings['machine']}.",
    ]
    ratios = record.get("auto_ratio")
    if ratios:
        header += ["", "Automatic ratio settled after 4 requests: " + ", ".join(f"{where} {ratio:.3f}" for where, ratio in ratios.items()) + "."]
    write_report(out_dir / "tune.md", "CacheTune TTFT per store", header, rows)
    _plot(out_dir / "tune.png", record["cells"])


def _plot(path: Path, cells: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    methods = list(cells[0]["ttft_s"])
    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(cells))]
        axis.bar(xs, [c["ttft_s"][method] for c in cells], width, label=method)
    axis.set_xticks(range(len(cells)), [c["store"] for c in cells])
    axis.set_ylabel("TTFT (s)")
    axis.set_title("full prefill vs blend vs CacheTune, per store")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
