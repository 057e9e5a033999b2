"""Shared pieces of benchmark reports: the machine's description and markdown tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown_rows(rows: list[dict]) -> list[str]:
    """A table of every column any row has (in first-seen order); a row without one leaves it empty."""
    if not rows:
        return ["(no rows)"]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return lines


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def write_report(out: Path, title: str, header: list[str], rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([f"# {title}", "", *header, "", *markdown_rows(rows), ""]))
    print(f"report written to {out}")
