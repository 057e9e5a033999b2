"""Settings from defaults, YAML, environment and flags; sampling reproducibility."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kvcake.cli import build_parser, main
from kvcake.config import CHOICES, ConfigError, KvcakeConfig, config_from_args, load_config, markdown_table
from kvcake.fetch import FetchError, PackageFile, materialise
from kvcake.model import Sampler, SamplingParams


def test_sources_are_layered_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tmp_path / "kvcake.yaml"
    settings.write_text("chunk_size: 128\nmax_tokens: 10\nmodel: qwen2.5-0.5b\n")
    monkeypatch.setenv("KVCAKE_MAX_TOKENS", "20")
    monkeypatch.setenv("KVCAKE_CONFIG", str(settings))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--chunk-size", "64"])
    config = config_from_args(args)
    assert (config.chunk_size, config.max_tokens, config.model) == (64, 20, "qwen2.5-0.5b")


def test_unknown_or_malformed_settings_are_refused(tmp_path: Path) -> None:
    settings = tmp_path / "bad.yaml"
    settings.write_text("chunk_sizes: 128\n")
    with pytest.raises(ConfigError, match="unknown setting 'chunk_sizes'"):
        load_config(str(settings))
    with pytest.raises(ConfigError, match="setting 'threads': cannot read 'many'"):
        load_config(overrides={"threads": "many"})


def test_settings_table_lists_every_field() -> None:
    table = markdown_table()
    for name in KvcakeConfig.model_fields:
        assert f"`KVCAKE_{name.upper()}`" in table


def test_seeded_sampling_is_reproducible_and_top_p_narrows() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    first, second = Sampler(params, torch.device("cpu")), Sampler(params, torch.device("cpu"))
    draws = [first(logits) for _ in range(10)]
    assert draws == [second(logits) for _ in range(10)]
    assert len(set(draws)) > 1
    tiny_nucleus = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=1), torch.device("cpu"))
    assert {tiny_nucleus(logits) for _ in range(20)} == {int(logits.argmax())}


def test_packaged_artefact_is_verified_by_sha256(tmp_path: Path) -> None:
    """A wheel already in the cache is used as is; a wrong digest is refused and nothing is left behind."""
    wheel_dir = tmp_path / "packages" / "demo-pkg-1.0"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "demo_pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("demo_pkg/data/a.bin", b"hello ")
        wheel.writestr("demo_pkg/data/b.bin", b"world")
    parts = [PackageFile("demo-pkg", "1.0", "demo_pkg/data/a.bin"), PackageFile("demo-pkg", "1.0", "demo_pkg/data/b.bin")]
    target = tmp_path / "out.bin"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        materialise(parts, target, "0" * 64, tmp_path)
    assert not target.exists()
    good = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert materialise(parts, target, good, tmp_path).read_bytes() == b"hello world"


def test_readme_settings_table_is_the_config() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert markdown_table() in readme


def test_penalties_and_bias_adjust_the_logits_as_openai_defines() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 10.0),)), torch.device("cpu"))
    assert torch.equal(sampler.adjusted(logits), torch.tensor([11.0, 2.0, 3.0, 0.5]))
    first = sampler(logits)
    assert first == 0
    second = sampler(logits)
    assert torch.allclose(sampler.adjusted(logits), torch.tensor([11.0 - 2 * 0.25 - 0.5, 2.0, 3.0, 0.5]))
    assert second == 0
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)


def _cli_in_fresh_interpreter(args: list[str]) -> tuple[str, bool]:
    """stdout of `kvcake ARGS` in a new interpreter, and whether torch got imported."""
    code = (
        "import contextlib, io, sys\n"
        "from kvcake import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        cli.main({args!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(out.getvalue())\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return done.stdout, done.stdout.rstrip().endswith("\nTORCH")


def test_help_and_config_do_not_import_torch() -> None:
    for args in (["--help"], ["config"], ["bench", "--help"], ["serve", "--help"]):
        out, torch_imported = _cli_in_fresh_interpreter(args)
        assert not torch_imported, f"kvcake {' '.join(args)} imported torch"
        assert out.strip()


def test_each_subcommand_shows_only_the_flags_it_uses() -> None:
    store_help, _ = _cli_in_fresh_interpreter(["bench", "store", "--help"])
    assert "--tiers" in store_help and "--api-keys" not in store_help and "--model" not in store_help
    serve_help, _ = _cli_in_fresh_interpreter(["serve", "--help"])
    assert "--api-keys" in serve_help and "--max-batch" in serve_help and "--model" in serve_help
    generate_help, _ = _cli_in_fresh_interpreter(["generate", "--help"])
    assert "--model" in generate_help and "--reuse" in generate_help and "--api-keys" not in generate_help


def test_sampling_draws_each_token_with_its_probability() -> None:
    from kvcake.model.sampling import _draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3])
    generator = torch.Generator().manual_seed(3)
    counts = torch.zeros(5)
    for _ in range(20000):
        counts[_draw(probs, generator)] += 1
    assert counts[0] == counts[2] == 0, "a token of probability 0 is never drawn"
    assert (counts / counts.sum() - probs).abs().max() < 0.015


@pytest.mark.parametrize(("name", "value"), [("reuse", "cak"), ("tune_scoring", "bogus"), ("dtype", "float8"), ("reuse", "split:")])
def test_a_setting_outside_its_choices_is_refused_at_construction_naming_it(name: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=f"setting '{name}' must be one of .*; got '{value}'"):
        KvcakeConfig(**{name: value})
    assert main(["config", f"--{name.replace('_', '-')}", value]) == 2
    assert f"setting '{name}' must be one of" in capsys.readouterr().err


def test_the_config_choices_are_what_the_mechanisms_parse() -> None:
    from kvcake.reuse.scores import RULES
    from kvcake.reuse.selective import CORRECTIONS, SELECTIONS
    from kvcake.reuse import parse_mode

    assert set(CHOICES["tune_scoring"]) == set(RULES)
    assert CHOICES["blend_selection"] == SELECTIONS and CHOICES["blend_correction"] == CORRECTIONS
    for mode in (choice.replace(":M", ":2") for choice in CHOICES["reuse"]):
        assert KvcakeConfig(reuse=mode).reuse == mode
        parse_mode(mode)


def test_every_mechanism_row_names_a_document_strategy() -> None:
    from kvcake.reuse import DocumentReuse, document_strategies

    classes = document_strategies()
    assert list(classes) == ["blend", "tune"]
    assert all(issubclass(mechanism, DocumentReuse) for mechanism in classes.values())


def test_help_shows_each_setting_description_as_written() -> None:
    """A `%` in a description must reach the help as itself (argparse formats help with `%`)."""
    parser = build_parser()
    serve = next(action for action in parser._subparsers._group_actions[0].choices.values() if action.prog.endswith(" serve"))
    help_text = " ".join(serve.format_help().split())
    assert "option_strings" not in help_text
    for name, item in KvcakeConfig.model_fields.items():
        if item.json_schema_extra["scope"] in ("model", "reuse"):
            assert " ".join(item.description.split()) in help_text, name
