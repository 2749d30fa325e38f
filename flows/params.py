"""Read params.yaml once, at the entry point."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.params import Params, ParamsError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Parse params.yaml into typed sections; every problem names the file and the key."""
    path = Path(path)
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
    return Params.from_dict(raw or {}, source=str(path))


def write_params(params: Params, path: str | Path) -> Path:
    """Write ``params`` as a params file that :func:`load_params` reads back equal."""
    path = Path(path)
    plain = json.loads(json.dumps(params.to_dict()))  # tuples become lists: plain YAML
    path.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    return path
