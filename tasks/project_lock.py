"""One lock per project, and the file lock it and the other locks are built on.

The project lock guards what reads or changes data/, its snapshot, the stages or the registry.

Ingest, the nightly flow, the pipeline stages started from the command line (what
``dvc repro`` runs) and publish/rollback each hold it while they work, so a snapshot,
its validation and the model trained on it always describe the same files. A second
caller waits up to ``lock.timeout`` seconds, then fails naming the holder's PID and
command. The OS lock (filelock: ``flock`` on Linux) is released by the kernel when its
holder dies, so a killed run never blocks the next one.

Entry points take it (the CLI commands and the flows), never the functions in
``tasks``: a flow holds it for its whole run and the stages it calls run inside.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.errors import FanaoiError

LOCK_FILE = Path(".fanaoi") / "project.lock"
PROJECT_MARKER = "dvc.yaml"  # the folder holding the stage graph is the project
HOLDER_SUFFIX = ".holder.json"  # beside the lock: who holds it (the lock file itself is the OS's)


class ProjectLocked(FanaoiError):
    """Another command held the project lock past the timeout; a later attempt may pass."""

    transient = True


def project_root(start: Path | str = ".") -> Path:
    """The project ``start`` lies in: the nearest folder up from it that holds dvc.yaml.

    The commands work on the files of the folder they run in, whatever params file they
    read; a lock placed from ``--params`` would guard another folder than the one they
    change. Without a dvc.yaml above it, ``start`` itself is the project.
    """
    start = Path(start).resolve()
    return next((folder for folder in (start, *start.parents) if (folder / PROJECT_MARKER).is_file()), start)


@contextmanager
def project_lock(project_dir: Path | str, what: str, timeout: float) -> Iterator[None]:
    """Hold the project's lock while the block runs; wait up to ``timeout`` s for it.

    ``what`` names this holder (e.g. ``fanaoi ingest batch/``) for whoever waits next.
    """
    path = Path(project_dir) / LOCK_FILE
    with held_lock(path, what, timeout, lambda holder: ProjectLocked(
        f"{path}: {holder} holds the project lock; {what} waited {timeout:g} s (lock.timeout "
        f"in params.yaml). Wait for it to finish, or stop that process if it hangs, then rerun"
    )):
        yield


@contextmanager
def held_lock(
    path: Path, what: str, timeout: float, refusal: Callable[[str], FanaoiError]
) -> Iterator[None]:
    """Hold the OS lock at ``path`` while the block runs, across processes and threads.

    Waits up to ``timeout`` s (0: one attempt), then raises ``refusal(holder)``, where
    ``holder`` names the PID, host and ``what`` of the process that has it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    holder_file = path.with_name(path.name + HOLDER_SUFFIX)
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise refusal(_holder(holder_file)) from None
    try:
        holder_file.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "argv": sys.argv, "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }), encoding="utf-8")
        yield
    finally:
        lock.release()


def _holder(holder_file: Path) -> str:
    try:
        holder = json.loads(holder_file.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']} ({holder['command']}, "
                f"since {holder['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"
