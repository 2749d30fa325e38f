"""Read params.yaml once, at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.params import Params, ParamsError

DEFAULT_PARAMS = Path("params.yaml")
# The project's own params.yaml holds every default; another params file names only what it changes.
PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Parse a params file over the project's params.yaml; every problem names the file and the key."""
    path = Path(path)
    return params_from(_read_yaml(path), source=str(path))


def project_params_file(path: str | Path) -> Path:
    """``path`` resolved, when it is a project's params.yaml: its folder is the project to run.

    The dvc.yaml stages read params.yaml beside them and nothing else, so a pipeline run
    with another file would record in dvc.lock what those stages did not read.
    """
    path = Path(path).resolve()
    if path.name != "params.yaml":
        raise ParamsError(
            f"{path}: the dvc.yaml stages read the project's params.yaml, not another file; put these "
            f"values in the params.yaml of the project to run and pass that one (or no --params)"
        )
    return path


def params_from(changes: dict[str, Any], source: str = "params.yaml") -> Params:
    """The project's params with ``changes`` (nested like params.yaml) applied and checked."""
    defaults = _read_yaml(PROJECT_PARAMS)
    return Params.from_dict(_merged(defaults, changes), source=source)


def write_params(params: Params, path: str | Path) -> Path:
    """Write ``params`` as a params file that :func:`load_params` reads back equal."""
    path = Path(path)
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: not found; run from the project folder or pass --params PATH"
        ) from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections such as `train:`; fix its top level")
    return raw or {}


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged
