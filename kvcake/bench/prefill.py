"""`kvcake bench prefill`: our full prefill against the Hugging Face forward, same weights and prompt.

Both run in this process with the same thread count; runs are interleaved so drift
hits both sides alike, and the report gives medians and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from kvcake.bench.report import machine_description, write_report
from kvcake.config import config_from_args
from kvcake.data import long_text
from kvcake.engine import Engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1024,2048,4096", help="Prompt lengths in tokens, comma-separated.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per method and length (median reported).")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/prefill.md"), help="Markdown report path (JSON beside it).")


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    config = config_from_args(args)
    engine = Engine(config)
    hf_model = AutoModelForCausalLM.from_pretrained(engine.model_folder, dtype=engine.model.dtype).to(engine.model.device).eval()
    lengths = [int(x) for x in args.lengths.split(",")]
    tokens = engine.tokenizer.encode(long_text(config.cache_path(), max(lengths) * 6))
    if len(tokens) < max(lengths):
        raise ValueError(f"only {len(tokens)} tokens of text available for a {max(lengths)}-token prompt")
    rows = []
    for length in lengths:
        prompt = tokens[:length]
        methods = {
            f"ours (chunks of {config.chunk_size})": lambda: engine.prefill(prompt, length),
            "ours (one chunk)": lambda: _one_shot(engine, prompt),
            "hf forward": lambda: _hf_prefill(hf_model, prompt),
        }
        medians = _interleaved_medians(methods, args.repeats)
        hf = medians["hf forward"]
        row = {"tokens": length, **{f"{name} s": value for name, value in medians.items()}}
        row.update({f"{name} / hf": value / hf for name, value in medians.items() if name != "hf forward"})
        rows.append(row)
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    _save(args.out, config.model, engine, rows, args.repeats)


def _one_shot(engine: Engine, prompt: list[int]) -> None:
    model = engine.model
    model.forward(torch.tensor(prompt), torch.arange(len(prompt)), model.new_cache(len(prompt)))


def _hf_prefill(hf_model, prompt: list[int]) -> None:
    ids = torch.tensor([prompt], device=hf_model.device)
    hf_model(ids, use_cache=True, logits_to_keep=1)


def _interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        for call in methods.values():
            call()
        for _ in range(repeats):
            for name, call in methods.items():
                _sync()
                started = time.perf_counter()
                call()
                _sync()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _save(out: Path, model_name: str, engine: Engine, rows: list[dict], repeats: int) -> None:
    header = [
        f"Model `{model_name}`, dtype {engine.model.dtype}, device {engine.model.device}, "
        f"{torch.get_num_threads()} threads, median of {repeats} interleaved runs.",
        f"Machine: {machine_description()}.",
        "",
        "Ratio = our time / Hugging Face `forward` time on the same prompt (target <= 1.05).",
    ]
    write_report(out, "Prefill: kvcake runner vs Hugging Face forward", header, rows)
    out.with_suffix(".json").write_text(json.dumps({"model": model_name, "python": platform.python_version(), "rows": rows}, indent=2))
