"""dvc.yaml's code deps are derived from the imports: an edit to any module a stage runs reruns it.

A stage's ``cmd`` (``fanaoi <stage>``) runs the CLI function registered under that name in
one of the modules of ``flows/cli/``; its imports, followed through ``tasks/`` and ``flows/``
(a module named in a string, run with ``python -m``, counts too), are the code the stage runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows")
CLI = ROOT / "flows" / "cli"
MODULE_NAME = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+$")


def module_file(name: str) -> Path | None:
    """The file of a project module (``tasks.registry.gate`` -> tasks/registry/gate.py); None elsewhere."""
    if name.split(".", maxsplit=1)[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """Import nodes under ``if TYPE_CHECKING:``: they never run."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(n for statement in node.body for n in ast.walk(statement))
    return skipped


def imported_files(node: ast.AST) -> set[Path]:
    """Project modules imported anywhere under ``node`` (function bodies too), or named to run."""
    skipped = _type_checking_only(node)
    found: set[Path] = set()
    for child in ast.walk(node):
        if child in skipped:
            continue
        names: list[str] = []
        if isinstance(child, ast.Import):
            names = [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
            names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            names = [child.value] if MODULE_NAME.match(child.value) else []
        found.update(path for path in map(module_file, names) if path is not None)
    return found


def transitive_imports(start: set[Path]) -> set[Path]:
    seen: set[Path] = set()
    pending = list(start)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending.extend(imported_files(ast.parse(path.read_text(encoding="utf-8"))) - seen)
    return {path for path in seen if path.name != "__init__.py" or path.stat().st_size}


def command_function(name: str) -> ast.FunctionDef:
    """The CLI function of ``fanaoi <name>``: the one registered with ``@command("<name>", ...)``."""
    found = [
        node
        for module in sorted(CLI.glob("*.py"))
        for node in ast.parse(module.read_text(encoding="utf-8")).body
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and ast.unparse(d.func) == "command"
            and d.args and isinstance(d.args[0], ast.Constant) and d.args[0].value == name
            for d in node.decorator_list
        )
    ]
    assert len(found) == 1, f"{CLI}: {len(found)} functions registered as `fanaoi {name}`"
    return found[0]


def cli_helpers() -> dict[str, ast.FunctionDef]:
    """The module-level functions of the flows/cli package, by name."""
    return {node.name: node for module in sorted(CLI.glob("*.py"))
            for node in ast.parse(module.read_text(encoding="utf-8")).body if isinstance(node, ast.FunctionDef)}


def called_helpers(function: ast.FunctionDef, helpers: dict[str, ast.FunctionDef]) -> list[ast.FunctionDef]:
    """``function`` and the CLI helpers it calls by name, directly or through each other."""
    found, pending = {function.name: function}, [function]
    while pending:
        for node in ast.walk(pending.pop()):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers \
                    and node.func.id not in found:
                found[node.func.id] = helpers[node.func.id]
                pending.append(helpers[node.func.id])
    return list(found.values())


def stage_code(cmd: str) -> set[str]:
    """Project files ``cmd`` runs (its CLI function and the CLI helpers it calls), relative to the root."""
    program, name = cmd.split()[:2]
    assert program == "fanaoi", f"{cmd!r}: expected `fanaoi <stage>`"
    functions = called_helpers(command_function(name), cli_helpers())
    start = set().union(*(imported_files(function) for function in functions))
    return {str(path.relative_to(ROOT)) for path in transitive_imports(start)}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_every_module_it_runs(stage: str) -> None:
    spec = STAGES[stage]
    deps = {str(next(iter(d))) if isinstance(d, dict) else str(d) for d in spec["deps"]}
    code = stage_code(spec["cmd"])
    assert any(path.startswith("tasks/") and path.endswith(f"/{stage}.py") for path in code)  # its own module
    missing = sorted(code - deps)
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not list them in deps"
    stale = sorted(dep for dep in deps if dep.endswith(".py") and dep not in code)
    assert not stale, f"dvc.yaml: stage {stage} lists {stale} in deps but never runs them"


def test_imports_are_followed_through_function_bodies_and_python_m() -> None:
    gate = stage_code("fanaoi gate")
    assert {"tasks/registry/gate.py", "tasks/registry/store.py", "tasks/inference/predictor.py",
            "tasks/params.py"} <= gate
    assert "tasks/model/history.py" in stage_code("fanaoi evaluate")
