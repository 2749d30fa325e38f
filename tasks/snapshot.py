"""Snapshots of the data folder with DVC.

``dvc add data`` records the folder's content hash in ``data.dvc`` (the snapshot id every
model card cites), ``dvc push`` copies the files to the DVC remote, and ``dvc checkout``
of an older ``data.dvc`` brings that exact folder back.

DVC is driven through its command line (``python -m dvc`` of this interpreter, so the
DVC next to FanAOI is used whatever PATH says). The CLI is DVC's supported interface, its
``Repo`` class is not; each call releases DVC's lock when its process ends; and the
in-process API saved well under a second per call on a 2,000-image folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.errors import FanaoiError

DEFAULT_REMOTE_HINT = "dvc remote add -d local ~/.cache/fanaoi/dvc-remote"


class SnapshotError(FanaoiError):
    """DVC could not record or push the data snapshot; the message says what to fix."""


def pointer_file(repo_dir: Path | str, data_dir: str = "data") -> Path:
    """The DVC pointer of ``data_dir``: ``data.dvc`` beside the folder."""
    return Path(repo_dir) / f"{data_dir}.dvc"


def data_snapshot_id(repo_dir: Path | str, data_dir: str = "data") -> str | None:
    """The md5 DVC recorded for ``data_dir`` (``<hash>.dir``), or None before the first snapshot."""
    pointer = pointer_file(repo_dir, data_dir)
    if not pointer.is_file():
        return None
    try:
        return str(yaml.safe_load(pointer.read_text(encoding="utf-8"))["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise SnapshotError(
            f"{pointer}: not a DVC pointer file (no outs[0].md5); restore it with "
            f"`git checkout -- {pointer.name}` or recreate it with `dvc add {data_dir}`"
        ) from None


def snapshot_data(repo_dir: Path | str, data_dir: str = "data", push: bool = True) -> dict:
    """``dvc add`` the data folder, then ``dvc push`` it; returns md5, changed, pushed."""
    repo_dir = Path(repo_dir)
    require_dvc_repo(repo_dir)
    if not (repo_dir / data_dir).is_dir():
        raise SnapshotError(
            f"{repo_dir / data_dir}: data folder not found; create it (one subfolder per class) "
            f"or restore the last snapshot with `dvc checkout {data_dir}.dvc`"
        )
    before = data_snapshot_id(repo_dir, data_dir)
    run_dvc(repo_dir, "add", data_dir)
    after = data_snapshot_id(repo_dir, data_dir)
    if push:
        run_dvc(repo_dir, "push", pointer_file(repo_dir, data_dir).name)
    return {"md5": after, "changed": after != before, "pushed": push}


def commit_command(data_dir: str = "data", md5: str | None = None) -> str:
    """The git command that records the snapshot, for the user to run."""
    return f"git add {data_dir}.dvc && git commit -m {shlex.quote(commit_message(md5))}"


def commit_message(md5: str | None, detail: str = "") -> str:
    short = (md5 or "none")[:8]
    return f"Data snapshot {short}" + (f": {detail}" if detail else "")


def commit_snapshot(repo_dir: Path | str, message: str, data_dir: str = "data") -> bool:
    """Commit ``data.dvc`` alone (other staged changes stay staged); False if unchanged."""
    repo_dir = Path(repo_dir)
    name = pointer_file(repo_dir, data_dir).name
    if not _git(repo_dir, "status", "--porcelain", "--", name).strip():
        return False
    _git(repo_dir, "add", "--", name)
    _git(repo_dir, "commit", "--quiet", "-m", message, "--", name)
    return True


def require_dvc_repo(repo_dir: Path) -> None:
    if not (repo_dir / ".dvc").is_dir():
        raise SnapshotError(
            f"{repo_dir}: not a DVC repository (no .dvc folder); run `git init && dvc init` "
            f"there, then `{DEFAULT_REMOTE_HINT}`"
        )


def run_dvc(repo_dir: Path | str, *args: str) -> str:
    """One dvc command in ``repo_dir``; a failure raises SnapshotError with the fix."""
    if importlib.util.find_spec("dvc") is None:
        raise SnapshotError(
            f"dvc is not installed for {sys.executable}; run `make venv` "
            f"(installs requirements.lock) or `pip install 'dvc>=3.60,<4'`"
        )
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo_dir, env=env, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        output = result.stderr + result.stdout
        raise SnapshotError(explain_dvc_failure(Path(repo_dir), args, output))
    return result.stdout


def explain_dvc_failure(repo_dir: Path, args: tuple[str, ...], output: str) -> str:
    """Turn DVC's error output into one line that names what to fix."""
    command = "dvc " + " ".join(a for a in args if not a.startswith("-"))
    errors = re.findall(r"ERROR: (.*)", output)
    lines = output.strip().splitlines()
    reason = " ".join(errors) if errors else (lines[-1] if lines else "no output, see `dvc doctor`")
    if "no remote specified" in output:
        return (
            f"{repo_dir}: `{command}` found no DVC remote; add one with `{DEFAULT_REMOTE_HINT}` "
            f"(S3/GCS/Azure: see README, Data versioning) or skip the push with --no-push"
        )
    if "No space left on device" in output or "Errno 28" in output:
        return (
            f"{repo_dir}: disk full during `{command}`; free space on the disk holding the DVC "
            f"cache ({repo_dir / '.dvc' / 'cache'}) or the remote (`dvc remote list`), then rerun"
        )
    if "Unable to acquire lock" in output:
        return f"{repo_dir}: another dvc command holds the repository lock; wait for it, then rerun"
    if "not inside of a DVC repository" in output:
        return f"{repo_dir}: not a DVC repository; run `dvc init` there"
    return f"{repo_dir}: `{command}` failed: {reason}"


def _git(repo_dir: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip() or result.stdout.strip()
        raise SnapshotError(f"{repo_dir}: `git {' '.join(args)}` failed: {reason}")
    return result.stdout
