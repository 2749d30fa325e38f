"""A throwaway git + DVC project for tests: its own local remote, tiny params, no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough that each stage is a few seconds on a 2-core CPU.
TINY_PARAMS = {
    "data": {"split": {"train": 0.6, "validation": 0.25, "test": 0.15}},
    "model": {"input_size": [32, 32], "conv_filters": [8, 16], "dense_units": 16},
    "train": {"epochs": 1, "batch_size": 16},
    "validate": {"min_per_class": 5},
    "evaluate": {"max_gap": 1.0, "max_overfit": 1.0},
}


def tool_env() -> dict[str, str]:
    """The environment of `fanaoi` and `dvc` subprocesses: this venv first on PATH."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }


def run(cwd: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, cwd=cwd, env=tool_env(), capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_dvc_repo(root: Path, remote: Path | None) -> Path:
    """git init + dvc init at ``root`` with the project's DVC config; ``remote`` as default."""
    root.mkdir(parents=True, exist_ok=True)
    run(root, "git", "init", "--quiet")
    run(root, "git", "config", "user.email", "test@example.com")
    run(root, "git", "config", "user.name", "FanAOI test")
    run(root, str(BIN / "dvc"), "init", "--quiet")
    # The project's settings, written directly: each `dvc config` call costs a second.
    config = "[core]\n    analytics = false\n    check_update = false\n"
    if remote is not None:
        config += f"    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    (root / ".dvc" / "config").write_text(config, encoding="utf-8")
    shutil.copy(PROJECT / ".gitignore", root / ".gitignore")
    return root


def make_pipeline_repo(root: Path, remote: Path) -> Path:
    """A DVC project with the real dvc.yaml, the stage code it depends on and tiny params."""
    make_dvc_repo(root, remote)
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(PROJECT / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    run(root, "git", "add", "--all")
    run(root, "git", "commit", "--quiet", "-m", "project")
    return root


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes, for before/after checks."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }
