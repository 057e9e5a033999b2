"""`kvcake eval scale RUN.json ...`: how naive reuse, blend and tune fare as the model grows.

Reads saved `kvcake eval blend` runs (one per model, same prompt length), keeps the
questions every run answered (matched by question text), and reports per model the
paired F1 gap to its own full prefill, with a 95% bootstrap CI, and the mean first-token
KL, for naive reuse, blend at r = 0.15 and tune at r = 0.15. The share of the full prefill's F1
lost puts models that answer more or less well on one scale. Distractor passages can
differ between runs whose tokenizers differ (they are picked to fill the token budget).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcake.bench.blend_eval import mean_with_ci
from kvcake.bench.report import markdown_rows

PARAMETERS_B = {"smollm2-135m": 0.135, "qwen2.5-0.5b": 0.5, "qwen2.5-1.5b": 1.5}
"""Model size in billions of parameters, for the x axis."""
METHODS = ("naive", "blend r=0.15", "tune r=0.15 highpass")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="Saved eval results (JSON), one per model.")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default="blend-eval-scale", help="File stem of the report.")


def run(args: argparse.Namespace) -> int:
    runs = [json.loads(path.read_text()) for path in args.runs]
    common = set.intersection(*({record["question"] for record in run["records"]} for run in runs))
    if not common:
        raise SystemExit("the runs share no question")
    rows = [row for run in sorted(runs, key=_size) for row in _rows(run, common)]
    header = [
        f"{len(common)} questions answered by every run; gaps are paired per question against each model's own full prefill.",
        "Runs: " + ", ".join(f"`{path.name}`" for path in args.runs) + ".",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.md").write_text("\n".join([f"# Quality gap by model size: {args.name}", "", *header, "", *markdown_rows(rows), ""]))
    (args.out_dir / f"{args.name}.json").write_text(json.dumps({"questions": len(common), "rows": rows}, indent=1))
    _plot(rows, args.out_dir / f"{args.name}.png")
    print("\n".join(markdown_rows(rows)))
    return 0


def _size(run: dict) -> float:
    model = run["settings"]["model"]
    if model not in PARAMETERS_B:
        raise ValueError(f"eval scale: the size of model {model!r} is unknown (known: {', '.join(PARAMETERS_B)})")
    return PARAMETERS_B[model]


def _rows(run: dict, common: set[str]) -> list[dict]:
    records = [record for record in run["records"] if record["question"] in common]
    rows = []
    for method in METHODS:
        if method not in records[0]:
            continue
        gap, low, high = mean_with_ci([r[method]["f1"] - r["full"]["f1"] for r in records])
        full_f1 = sum(r["full"]["f1"] for r in records) / len(records)
        rows.append({
            "model": run["settings"]["model"],
            "params (B)": _size(run),
            "method": method,
            "full F1": full_f1,
            "F1 - full": gap,
            "gap 95% CI": f"[{low:.3f}, {high:.3f}]",
            "share of full F1 lost": -gap / full_f1 if full_f1 else None,
            "first-token KL": sum(r[method]["first_token_kl"] for r in records) / len(records),
        })
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gaps, kls) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        members = sorted((row for row in rows if row["method"] == method), key=lambda row: row["params (B)"])
        if not members:
            continue
        sizes = [row["params (B)"] for row in members]
        gaps.plot(sizes, [row["F1 - full"] for row in members], "o-", label=method)
        kls.plot(sizes, [row["first-token KL"] for row in members], "o-", label=method)
    gaps.axhline(0.0, color="grey", linewidth=0.8)
    gaps.axhline(-0.02, color="grey", linewidth=0.8, linestyle="--", label="-0.02 (target)")
    gaps.set_title("token F1 minus the full prefill's")
    kls.set_title("first-token KL to the full prefill")
    models = sorted({(row["params (B)"], row["model"]) for row in rows})
    for axis in (gaps, kls):
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks([size for size, _ in models], [f"{name}\n{size:g}B" for size, name in models])
        axis.set_xlabel("model parameters (log scale)")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
