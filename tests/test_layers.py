"""Imports run down the layers only: base < data < inference < model < registry < flows.

The inference package (model files, the decision rule, scoring) stands below both the
model package, which builds and trains, and the registry, which publishes: anything the
model package needs from the registry (the champion to warm-start from, a version to
explain) is resolved above it and handed in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base", "data", "inference", "model", "registry", "report", "flows")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[0] != "tasks" or len(parts) < 2:
        return None
    if parts[1] in ("data", "inference", "model", "registry"):
        return parts[1]
    return "report" if parts[1] == "nightly_report" else "base"


def imported_modules(path: Path) -> set[str]:
    """Every module imported anywhere in the file, function bodies and TYPE_CHECKING blocks too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


SOURCES = sorted(path for package in ("tasks", "flows") for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_import_runs_back_up_the_layers(path: Path) -> None:
    own = LAYERS.index(layer_of(module_name(path)))
    upward = sorted(module for module in imported_modules(path)
                    if (layer := layer_of(module)) is not None and LAYERS.index(layer) > own)
    assert not upward, f"{path.relative_to(ROOT)} ({LAYERS[own]}) imports {upward} from a higher layer"


def test_tasks_never_import_prefect() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in SOURCES
                 if path.parts[len(ROOT.parts)] == "tasks"
                 and any(module.split(".")[0] == "prefect" for module in imported_modules(path))]
    assert not offenders


def test_the_layer_rule_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tasks.registry.champion import read_champion\n", encoding="utf-8")
    assert "tasks.registry.champion" in imported_modules(module)
    assert LAYERS.index(layer_of("tasks.registry.champion")) > LAYERS.index(layer_of("tasks.model.train"))
