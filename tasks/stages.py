"""Ask DVC whether a dvc.yaml stage must run, and record a stage after it ran.

The nightly flow and ``dvc repro`` drive the same stages. Both consult one record,
``dvc.lock``: a stage whose deps, params and outs still match it is skipped, and after the
flow runs a stage it writes the new hashes there (``dvc commit``), so a following
``dvc repro`` (or the next night) does not redo the work, and the other way round.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import FanaoiError


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


def pipeline_changes(repo_dir: Path | str, stages: Sequence[str]) -> dict[str, list[str]]:
    """``stage_changes`` of several stages in one DVC call.

    Each call opens the project and parses dvc.yaml and dvc.lock again (about a second on
    2 cores): asked once for the whole pipeline, a night with nothing changed pays it once.
    """
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    repo = _open_repo(Path(repo_dir))
    try:
        status = repo.status(targets=[_target(Path(repo_dir), stage) for stage in stages])
    except LockError:
        raise  # another DVC process is busy: transient, the caller may retry
    except DvcException as exc:
        raise StageStateError(f"{Path(repo_dir) / 'dvc.yaml'}: stage(s) {', '.join(stages)}: {exc}") from None
    finally:
        repo.close()
    changes: dict[str, list[str]] = {stage: [] for stage in stages}
    for address, entries in status.items():  # "<dvc.yaml relative to the cwd>:<stage>"
        stage = address.rsplit(":", 1)[-1]
        if stage not in changes:
            raise StageStateError(f"{Path(repo_dir) / 'dvc.yaml'}: DVC answered for {address!r}, "
                                  f"not one of the stages asked ({', '.join(stages)})")
        changes[stage] = [_describe(entry) for entry in entries]
    return changes


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
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise RunInProgress(
                f"{lock_path}: another {what} is running ({holder}); this run did nothing. "
                f"Wait for it to finish (the lock is released when it ends)."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
