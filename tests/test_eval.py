"""`kvcake eval blend --data FILE`: the quality evaluation on a user's own JSON-lines QA set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvcake.cli import main
from kvcake.config import KvcakeConfig
from kvcake.data import jsonl_questions

FIXTURE = Path(__file__).parent / "data" / "qa.jsonl"


def test_eval_runs_on_a_jsonl_file(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "3", "--prompt-tokens", "400", "--ratios", "0.3", "--tune-ratios", "0.3"]
    assert main([*run, "--answer-tokens", "2", "--out-dir", str(tmp_path), "--name", "mine", *flags]) == 0
    results = json.loads((tmp_path / "mine.json").read_text())
    assert results["settings"]["data"] == "qa" and len(results["records"]) == 3
    record = results["records"][0]
    assert {"full", "naive", "blend r=0.30"} <= set(record)
    assert record["full"]["first_token_kl"] == 0.0
    assert len(results["records"][0]["answers"]) >= 1
    report = (tmp_path / "mine.md").read_text()
    assert "Paired differences" in report and "qa passages" in report
    assert "Where the recompute budget went" in report and "| blend r=0.30 | 3 |" in report
    blend = record["blend r=0.30"]
    assert sum(blend["recomputed_per_document"]) == blend["tokens_recomputed"] and len(blend["tokens_per_document"]) >= 2
    tune = record["tune r=0.30 highpass"]
    assert sum(tune["recomputed_per_document"]) == tune["tokens_recomputed"] > 0 and tune["tokens_per_document"] == blend["tokens_per_document"]
    assert "| tune r=0.30 highpass | 3 |" in report


def test_resume_answers_saved_questions_by_new_methods(tiny_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "2", "--prompt-tokens", "300", "--answer-tokens", "2", "--out-dir", str(tmp_path), "--name", "grow"]
    assert main([*run, "--ratios", "0.3", *flags]) == 0
    first = json.loads((tmp_path / "grow.json").read_text())["records"]
    assert main([*run, "--ratios", "0.3,0.5", "--resume", *flags]) == 0
    grown = json.loads((tmp_path / "grow.json").read_text())["records"]
    assert [r["index"] for r in grown] == [r["index"] for r in first]
    for before, after in zip(first, grown):
        assert {name: after[name] for name in before} == before
        assert after["blend r=0.50"]["tokens_recomputed"] > before["blend r=0.30"]["tokens_recomputed"]
    assert "blend r=0.50" in (tmp_path / "grow.md").read_text()
    assert "warming passages" in capsys.readouterr().err
    assert main([*run, "--ratios", "0.3,0.5", "--resume", *flags]) == 0
    assert "warming passages" not in capsys.readouterr().err
    assert json.loads((tmp_path / "grow.json").read_text())["records"] == grown


def test_resume_refuses_a_run_saved_with_other_prompts(tiny_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "2", "--ratios", "0.3", "--answer-tokens", "2", "--out-dir", str(tmp_path), "--name", "one"]
    assert main([*run, "--prompt-tokens", "300", *flags]) == 0
    saved = (tmp_path / "one.json").read_text()
    assert main([*run, "--prompt-tokens", "400", "--resume", *flags]) == 2
    assert "prompt_tokens saved 300, given 400" in capsys.readouterr().err
    assert (tmp_path / "one.json").read_text() == saved


def test_resume_refuses_a_data_file_whose_questions_changed(tiny_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "qa.jsonl"
    lines = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(data), "--questions", "2", "--prompt-tokens", "300", "--ratios", "0.3", "--answer-tokens", "2", "--out-dir", str(tmp_path), "--name", "two"]
    assert main([*run, *flags]) == 0
    data.write_text("".join(json.dumps({**line, "question": line["question"] + " Exactly?"}) + "\n" for line in lines))
    assert main([*run, "--ratios", "0.3,0.5", "--resume", *flags]) == 2
    assert "question 0 saved" in capsys.readouterr().err
    assert "blend r=0.50" not in (tmp_path / "two.json").read_text()


def test_malformed_lines_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + json.dumps({"context": "c", "question": "q", "answers": []}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: answers"):
        jsonl_questions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        jsonl_questions(bad)


def test_scale_report_pairs_the_questions_every_run_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(model: str, questions: list[str], naive_f1: float) -> Path:
        scores = {"full": 1.0, "naive": naive_f1, "blend r=0.15": 0.9}
        records = [{"question": q, **{m: {"f1": f1, "first_token_kl": 1.0 - f1} for m, f1 in scores.items()}} for q in questions]
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps({"settings": {"model": model}, "records": records}))
        return path

    small, large = run("qwen2.5-0.5b", ["a", "b", "c"], 0.5), run("qwen2.5-1.5b", ["b", "c", "d"], 0.8)
    assert main(["eval", "scale", str(large), str(small), "--out-dir", str(tmp_path), "--name", "trend"]) == 0
    rows = json.loads((tmp_path / "trend.json").read_text())
    assert rows["questions"] == 2
    assert [(r["model"], r["method"], round(r["F1 - full"], 3)) for r in rows["rows"]] == [
        ("qwen2.5-0.5b", "naive", -0.5), ("qwen2.5-0.5b", "blend r=0.15", -0.1), ("qwen2.5-1.5b", "naive", -0.2), ("qwen2.5-1.5b", "blend r=0.15", -0.1)
    ]
    assert [round(r["share of full F1 lost"], 3) for r in rows["rows"]] == [0.5, 0.1, 0.2, 0.1]
    assert (tmp_path / "trend.png").stat().st_size > 0
    unknown = run("my-model", ["b"], 0.5)
    capsys.readouterr()
    assert main(["eval", "scale", str(large), str(unknown), "--out-dir", str(tmp_path)]) == 2
    assert "size of model 'my-model' is unknown" in capsys.readouterr().err


@pytest.mark.registry_data
def test_bench_load_reports_ttft_against_its_floor(tiny_folders: dict[str, Path], tmp_path: Path, default_config: KvcakeConfig) -> None:
    """Its prompt is essay text, from the shared cache (fetched there once)."""
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", default_config.cache_dir]
    out = tmp_path / "load.md"
    assert main(["bench", "load", "--chunks", "3", "--repeats", "2", "--out", str(out), *flags]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["store"] for row in rows] == ["memory", "file"]
    assert all(row["floor / TTFT"] > 0 and row["loaded MB"] > 0 for row in rows)


def test_methods_at_a_cost_spend_it_and_are_paired_with_current_blend(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "2", "--prompt-tokens", "400", "--answer-tokens", "2", "--ratios", "0.15"]
    variants = "question+offset,deviation,probe,question"
    assert main([*run, "--costs", "0.8", "--variants", variants, "--out-dir", str(tmp_path), "--name", "cost", *flags]) == 0
    results = json.loads((tmp_path / "cost.json").read_text())
    for record in results["records"]:
        assert record["full"]["compute_share"] == 1.0
        for name in ("deviation cost=0.80", "question+offset cost=0.80"):
            assert abs(record[name]["compute_share"] - 0.8) < 0.02, record[name]
        probe, deviation = record["probe cost=0.80"], record["deviation cost=0.80"]
        assert probe["ratio"] > deviation["ratio"], "probe computes no layer in full: the same cost buys more tokens"
        assert 0.78 < probe["compute_share"] < 1.0, "the cost, plus the probe's own pass"
        for variant in variants.split(","):
            selection, _, correction = variant.partition("+")
            applied = record[f"{variant} cost=0.80"]
            assert (applied["selection"], applied["correction"]) == (selection, correction or "none"), "each method runs with its own settings"
        assert (record["blend r=0.15"]["selection"], record["blend r=0.15"]["correction"]) == ("deviation", "none")
    report = (tmp_path / "cost.md").read_text()
    assert "| question+offset cost=0.80 | blend r=0.15 |" in report


def test_the_ratio_for_a_cost_inverts_the_compute_share() -> None:
    from kvcake.bench.blend_eval import ratio_for_cost

    # 28 layers, check layer 1 (2 layers in full), 2000 tokens of which 1800 in documents: r = 0.15 computes
    # (2 * 2000 + 26 * (200 + 270)) / (28 * 2000) of the full prefill
    share = (2 * 2000 + 26 * (200 + 0.15 * 1800)) / (28 * 2000)
    assert abs(ratio_for_cost(share, 28, 2, 2000, 1800) - 0.15) < 1e-9
    assert ratio_for_cost(0.01, 28, 2, 2000, 1800) == 1 / 1800 and ratio_for_cost(2.0, 28, 2, 2000, 1800) == 1.0
    # probe computes no layer in full: the same cost buys more recompute
    assert abs(ratio_for_cost((200 + 0.2 * 1800) / 2000, 28, 0, 2000, 1800) - 0.2) < 1e-9


def test_each_tune_scoring_rule_is_stored_and_read_in_its_own_layout(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "2", "--prompt-tokens", "400", "--ratios", "0.3", "--tune-ratios", "0.3"]
    entries = {}
    for scorings in ("highpass", "highpass,lowpass"):
        out = tmp_path / scorings.replace(",", "-")
        assert main([*run, "--scorings", scorings, "--answer-tokens", "2", "--out-dir", str(out), "--name", "r", "--store-url", f"file://{store}", *flags]) == 0
        entries[scorings] = sum(1 for path in store.rglob("*") if path.is_file())
        record = json.loads((out / "r.json").read_text())["records"][0]
        assert {f"tune r=0.30 {rule}" for rule in scorings.split(",")} <= set(record)
    passages = len({item.passage for item in jsonl_questions(FIXTURE)})
    assert entries["highpass,lowpass"] == entries["highpass"] + 2 * passages, "lowpass adds its scored entry and order per passage"
    alone = tmp_path / "lowpass"
    fresh = ["--store-url", f"file://{tmp_path / 'fresh'}", "--answer-tokens", "2", "--out-dir", str(alone), "--name", "r"]
    assert main([*run, "--scorings", "lowpass", *fresh, *flags]) == 0
    for record in json.loads((alone / "r.json").read_text())["records"]:
        assert record["tune r=0.30 lowpass"]["documents_computed"] == 0, "tune read the lowpass entries warmed for it"


def test_an_unknown_scoring_rule_is_refused_before_any_work(tiny_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "blend", "--data", str(FIXTURE), "--tune-ratios", "0.2", "--scorings", "highpas", "--out-dir", str(tmp_path), *flags]) == 2
    assert "unknown tune scoring rule 'highpas'; one of highpass" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_a_resumed_run_reads_the_full_prefills_logits_it_saved(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    """The full prefill's first-token logits are kept per question in the cache dir; a resume that adds a method
    measures its KL against them and gets what a run computing everything at once gets. A file saved for other
    prompts is not used."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    flags = ["--model", str(tiny_folders["llama"]), "--dtype", "float32", "--chunk-size", "32", "--cache-dir", str(tmp_path / "cache")]
    run = ["eval", "blend", "--data", str(FIXTURE), "--questions", "2", "--prompt-tokens", "300", "--answer-tokens", "2", "--out-dir", str(tmp_path)]
    assert main([*run, "--name", "grow", "--ratios", "0.3", *flags]) == 0
    saved = sorted((tmp_path / "cache" / "eval-logits" / "grow").glob("*.safetensors"))
    records = json.loads((tmp_path / "grow.json").read_text())["records"]
    assert [path.stem for path in saved] == sorted(str(r["index"]) for r in records)
    with safe_open(saved[1], framework="pt") as kept:
        metadata, logits = kept.metadata(), kept.get_tensor("logits")
    save_file({"logits": torch.zeros_like(logits)}, saved[0], metadata={**metadata, "prompt": "0" * 32})
    save_file({"logits": logits.flip(0)}, saved[1], metadata=metadata)  # read as saved: the KL shows it
    assert main([*run, "--name", "grow", "--ratios", "0.3,0.5", "--resume", *flags]) == 0
    assert main([*run, "--name", "once", "--ratios", "0.3,0.5", *flags]) == 0
    grown = {r["index"]: r["blend r=0.50"]["first_token_kl"] for r in json.loads((tmp_path / "grow.json").read_text())["records"]}
    once = {r["index"]: r["blend r=0.50"]["first_token_kl"] for r in json.loads((tmp_path / "once.json").read_text())["records"]}
    first, second = (int(path.stem) for path in saved)
    assert grown[first] == once[first], "a file saved for another prompt is not used: the full prefill runs again"
    assert grown[second] != once[second], "the saved logits are the reference"
