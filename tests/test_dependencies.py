"""Every package the code imports is declared in pyproject.toml, not only pulled in by another."""

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = Path(__file__).resolve().parents[1]
OWN = {"tasks", "flows", "bench", "tests"}


def imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names) - {"__future__"}


def test_every_imported_package_is_declared_with_bounds():
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in project["dependencies"]}
    distributions = packages_distributions()
    imported = set().union(*(imported_top_level(PROJECT / folder) for folder in ("tasks", "flows", "bench")))
    undeclared = sorted(
        f"{module} ({', '.join(distributions.get(module, ['?']))})" for module in imported
        if not any(d.lower().replace("_", "-") in declared for d in distributions.get(module, []))
    )
    assert undeclared == []
    assert [name for name, r in declared.items() if not any(s.operator == ">=" for s in r.specifier)] == []
    assert not declared["keras"].specifier.contains("3.99")  # .h5 safe-mode loading changes with Keras
