"""Ask DVC whether a dvc.yaml stage must run, and record a stage after it ran.

The nightly flow and ``dvc repro`` drive the same stages. Both consult one record,
``dvc.lock``: a stage whose deps, params and outs still match it is skipped, and after the
flow runs a stage it writes the new hashes there (``dvc commit``), so a following
``dvc repro`` (or the next night) does not redo the work, and the other way round.

Asking DVC costs about a second plus a check of every file of every dependency folder:
at 100,000 images most of a night with nothing to do. When DVC has just said that no
stage changed, a stamp records the bytes of dvc.yaml, dvc.lock and the params files and
the (path, size, mtime, inode) of every file the stages read or write; while that stamp
holds, the answer is still "nothing changed" and DVC is not asked (not even imported).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.durable import add_file_stats
from tasks.errors import FanaoiError
from tasks.project_lock import held_lock


class StageStateError(FanaoiError):
    """DVC cannot tell the state of a stage (no DVC project, broken dvc.yaml)."""


class RunInProgress(FanaoiError):
    """Another pipeline run holds the project's run lock."""


def _open_repo(repo_dir: Path) -> Any:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        return Repo(str(repo_dir))
    except DvcException as exc:
        raise StageStateError(
            f"{repo_dir}: not a DVC project ({exc}); run `dvc init` in that folder"
        ) from None


def _target(repo_dir: Path, stage: str) -> str:
    """The stage addressed through its dvc.yaml: DVC resolves a bare name from the cwd."""
    return f"{repo_dir.resolve() / 'dvc.yaml'}:{stage}"


def stage_changes(repo_dir: Path | str, stage: str) -> list[str]:
    """What changed since dvc.lock recorded ``stage``; empty when the stage is up to date."""
    return pipeline_changes(repo_dir, [stage])[stage]


def pipeline_changes(
    repo_dir: Path | str, stages: Sequence[str], stamp_dir: Path | str | None = None,
) -> dict[str, list[str]]:
    """``stage_changes`` of several stages in one DVC call.

    Each call opens the project and parses dvc.yaml and dvc.lock again (about a second on
    2 cores): asked once for the whole pipeline, a night with nothing changed pays it once.
    With ``stamp_dir`` (relative to ``repo_dir``), the module docstring's stamp spares
    even that while nothing changed.
    """
    repo_dir = Path(repo_dir)
    stamp = repo_dir / stamp_dir / "pipeline-unchanged.txt" if stamp_dir is not None else None
    before = _inputs_digest(repo_dir, stages) if stamp else None
    if stamp and before is not None and _read_text(stamp) == before:
        return {stage: [] for stage in stages}
    changes = _ask_dvc(repo_dir, stages)
    if stamp and before is not None and not any(changes.values()):
        # Only what DVC saw: a file changed while it looked leaves no stamp.
        if _inputs_digest(repo_dir, stages) == before:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(before, encoding="utf-8")
    elif stamp:
        stamp.unlink(missing_ok=True)
    return changes


def _ask_dvc(repo_dir: Path, stages: Sequence[str]) -> dict[str, list[str]]:
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    repo = _open_repo(repo_dir)
    try:
        status = repo.status(targets=[_target(repo_dir, stage) for stage in stages])
    except LockError:
        raise  # another DVC process is busy: transient, the caller may retry
    except DvcException as exc:
        raise StageStateError(f"{repo_dir / 'dvc.yaml'}: stage(s) {', '.join(stages)}: {exc}") from None
    finally:
        repo.close()
    changes: dict[str, list[str]] = {stage: [] for stage in stages}
    for address, entries in status.items():  # "<dvc.yaml relative to the cwd>:<stage>"
        stage = address.rsplit(":", 1)[-1]
        if stage not in changes:
            raise StageStateError(f"{repo_dir / 'dvc.yaml'}: DVC answered for {address!r}, "
                                  f"not one of the stages asked ({', '.join(stages)})")
        changes[stage] = [_describe(entry) for entry in entries]
    return changes


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _inputs_digest(repo_dir: Path, stages: Sequence[str]) -> str | None:
    """A digest of everything DVC compares for ``stages``; None when it cannot be trusted."""
    import yaml

    try:
        graph = yaml.safe_load((repo_dir / "dvc.yaml").read_text(encoding="utf-8"))
        lock = (repo_dir / "dvc.lock").read_bytes()
    except (OSError, yaml.YAMLError):
        return None
    digest = hashlib.sha256(json.dumps(list(stages)).encode() + b"\0" + lock)
    files: set[str] = {"dvc.yaml", ".dvcignore"}
    for stage in stages:
        spec = (graph.get("stages") or {}).get(stage)
        if not isinstance(spec, dict) or spec.get("always_changed") or spec.get("frozen"):
            return None
        files.update(_paths(spec.get("deps")) | _paths(spec.get("outs")) | _paths(spec.get("metrics"))
                     | _paths(spec.get("plots")))
        files.update(_params_files(spec.get("params")))
    for name in sorted(files):
        add_file_stats(digest, repo_dir / name, name)
    return digest.hexdigest()


def _paths(entries: Any) -> set[str]:
    """Paths of a dvc.yaml list (``- path`` or ``- path: {options}``)."""
    return {str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries or []}


def _params_files(entries: Any) -> set[str]:
    """params.yaml for plain keys, the file named for ``- file.yaml: [keys]`` entries."""
    return {str(next(iter(e))) if isinstance(e, dict) else "params.yaml" for e in entries or []}


def _describe(entry: dict[str, Any] | str) -> str:
    """One DVC status entry as text, e.g. ``changed deps: data (modified)``."""
    if isinstance(entry, str):
        return entry
    parts = []
    for kind, changes in entry.items():
        items = []
        for path, change in changes.items():
            detail = ", ".join(change) if isinstance(change, dict) else change
            items.append(f"{path} ({detail})")
        parts.append(f"{kind}: {', '.join(items)}")
    return "; ".join(parts)


def record_stage(repo_dir: Path | str, stage: str) -> None:
    """Write the stage's current deps, params and outs to dvc.lock (``dvc commit -f``)."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    repo = _open_repo(Path(repo_dir))
    try:
        repo.commit(_target(Path(repo_dir), stage), force=True)
    except LockError:
        raise
    except DvcException as exc:
        raise StageStateError(
            f"{Path(repo_dir) / 'dvc.lock'}: cannot record stage {stage!r} ({exc}); "
            f"check that its outs in dvc.yaml were written"
        ) from None
    finally:
        repo.close()


@contextmanager
def exclusive_run(lock_path: Path | str, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for one run; a second run is refused at once, not queued.

    The lock is an OS file lock: it also excludes other processes, and the kernel drops it
    when a run dies, so a crash never leaves a stale lock behind.
    """
    with held_lock(Path(lock_path), what, 0, lambda holder: RunInProgress(
        f"{lock_path}: another {what} is running ({holder}); this run did nothing. "
        f"Wait for it to finish (the lock is released when it ends)."
    )):
        yield
