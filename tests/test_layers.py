"""The layering of the code (docs/design.md): a module imports only its own layer and the ones below it.

Read from the source with `ast`, so it runs without importing anything; rerun it after moving code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "kvcake"
LAYERS = [
    {"kvcake.config", "kvcake.modes", "kvcake.runtime", "kvcake.fetch", "kvcake.chunk"},
    {"kvcake.model", "kvcake.store", "kvcake.data"},
    {"kvcake.reuse", "kvcake.requests"},
    {"kvcake.engine"},
    {"kvcake.server", "kvcake.bench", "kvcake.cli"},
]
"""Lowest first: foundations; math, bytes and data; the reuse mechanisms and request planning; the engine;
what serves, measures and commands it."""


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under kvcake, or the top-level module."""
    return ".".join(module.split(".")[:2])


def _layer(module: str) -> int:
    unit = _unit(module)
    return next(index for index, units in enumerate(LAYERS) if unit in units)


def _imports() -> dict[str, set[str]]:
    """Module -> the kvcake modules it imports (at any depth of its code)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvcake"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("kvcake"))
        found[module] = names
    return found


def test_every_module_has_a_layer() -> None:
    for module in _imports():
        if module != "kvcake":
            assert any(_unit(module) in units for units in LAYERS), f"{module} is in no layer"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{module} -> {target}" for module, targets in _imports().items() if module != "kvcake"
              for target in targets if _layer(target) > _layer(module)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_the_packages_import_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        if module != "kvcake":
            edges.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in edges.get(start, ()))

    cycles = sorted(unit for unit in edges if reaches(unit, unit, {unit}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_the_table_of_mechanisms_imports_nothing_and_names_reuse_classes() -> None:
    """kvcake.modes is what the settings read without torch, and its rows name classes by path, which the
    import checks above cannot see: those must live in the reuse layer."""
    from kvcake.modes import DOCUMENT_MECHANISMS

    assert _imports()["kvcake.modes"] == set()
    assert all(path.startswith("kvcake.reuse.") for path in DOCUMENT_MECHANISMS.values())
