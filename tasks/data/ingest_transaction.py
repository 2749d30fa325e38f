"""Apply an ingest to ``data/`` atomically, and recover from an ingest killed half-way.

The new data folder is built beside the old one in a staging folder (hard links to the
files already there, checked copies of the accepted ones, the source index rewritten) and
swapped in with one rename: an ingest interrupted at any point leaves ``data/`` as it was
or complete, and the next ingest finishes or discards what the killed one left behind.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from tasks.durable import fsync_path
from tasks.errors import FanaoiError
from tasks.project_lock import held_lock

log = logging.getLogger(__name__)

INDEX_NAME = ".sources.jsonl"
STAGING_PREFIX = ".fanaoi-ingest-"
LOCK_NAME = ".fanaoi-ingest.lock"
COMPLETE_MARKER = "complete"
_COPY_CHUNK = 1 << 20


class IngestError(FanaoiError):
    """The batch cannot be ingested as given; the message names the path and the fix."""


class AddedFile(NamedTuple):
    """An accepted batch file and where it goes."""

    source: Path
    place: Path  # inside the data folder
    sha256: str  # of the bytes that were judged


def add_to_data(data_dir: Path, accepted: list[AddedFile], index_entries: list[dict]) -> None:
    """Build the new data folder beside the old one, then swap it in with one rename."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=data_dir.parent))
    try:
        new_tree = staging / "new"
        _link_tree(data_dir, new_tree)
        for file in accepted:
            target = new_tree / file.place
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_checked(file.source, target, file.sha256)
        _write_index(data_dir / INDEX_NAME, new_tree / INDEX_NAME, index_entries)
        fsync_path(staging)
        (staging / COMPLETE_MARKER).touch()
        swap_in(new_tree, data_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_no_follow(path: Path) -> int:
    """A read descriptor on ``path`` itself: never a symlink's target, never a FIFO or device."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return descriptor


def copy_checked(source: Path, target: Path, sha256: str) -> None:
    """Copy the bytes that were judged, flushed to disk, or raise IngestError.

    The source is opened without following a symlink and hashed while it is copied: a
    file swapped (for a symlink, or other bytes) between its check and its copy is
    refused instead of entering the data set under a name its bytes do not match.
    """
    digest = hashlib.sha256()
    try:
        with os.fdopen(open_no_follow(source), "rb") as origin, target.open("xb") as copy:
            while chunk := origin.read(_COPY_CHUNK):
                digest.update(chunk)
                copy.write(chunk)
            copy.flush()
            os.fsync(copy.fileno())
    except OSError as exc:
        raise _copy_failure(source, target, exc) from None
    if digest.hexdigest() != sha256:
        raise IngestError(
            f"{source}: changed after it was checked (sha256 {sha256[:12]}... then, "
            f"{digest.hexdigest()[:12]}... now); nothing was added. Rerun the ingest once "
            f"nothing writes to the batch any more"
        )


def _copy_failure(source: Path, target: Path, exc: OSError) -> IngestError:
    if exc.errno == errno.ELOOP:
        return IngestError(
            f"{source}: became a symlink after it was checked; nothing was added. Put the "
            f"file itself in the batch and rerun"
        )
    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    fix = f"free space on the disk of {target.parent}" if full else "check the file"
    return IngestError(
        f"{source}: copying it to {target} failed ({exc.strerror or exc}); nothing was "
        f"added: {fix}, then rerun the ingest", transient=full,
    )


def swap_in(new_tree: Path, data_dir: Path, staging: Path) -> None:
    """Put ``new_tree`` at ``data_dir``; the old folder ends up inside ``staging``."""
    if not data_dir.exists():
        new_tree.rename(data_dir)
    elif not _exchange(new_tree, data_dir):
        # Two renames: a crash between them is rolled forward by recover_interrupted.
        data_dir.rename(staging / "old")
        new_tree.rename(data_dir)
    fsync_path(data_dir.parent)


def recover_interrupted(data_dir: Path, report: Callable[[str], None] = log.info) -> None:
    """Finish or discard what an ingest killed half-way left beside the data folder."""
    for leftover in sorted(data_dir.parent.glob(STAGING_PREFIX + "*")):
        if not data_dir.exists():
            complete = (leftover / COMPLETE_MARKER).exists() and (leftover / "new").is_dir()
            source = leftover / ("new" if complete else "old")
            if source.is_dir():
                source.rename(data_dir)
                report(f"restored {data_dir} from an interrupted ingest ({leftover})")
        shutil.rmtree(leftover, ignore_errors=True)
        report(f"removed {leftover}, left by an interrupted ingest")


@contextmanager
def ingest_lock(data_dir: Path) -> Iterator[None]:
    """One ingest into a data folder at a time, across processes."""
    lock_path = data_dir.parent / LOCK_NAME
    with held_lock(lock_path, f"ingest into {data_dir}", 0, lambda holder: IngestError(
        f"{lock_path}: another ingest into {data_dir} is running ({holder}); wait for it to finish"
    )):
        yield


def write_failure(path: Path, what: str, exc: OSError) -> IngestError:
    """A write that failed before data/ was swapped: name the file, say nothing was added."""
    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return IngestError(
        f"{path}: cannot write {what} ({exc.strerror or exc}); nothing was added to the data "
        f"set. {'Free space on that disk' if full else 'Fix the folder'}, then rerun the ingest",
        transient=full,
    )


def _write_index(old: Path, new: Path, entries: list[dict]) -> None:
    # A fresh file, never the hard link to the old one: the old folder must stay as it was.
    lines = old.read_text(encoding="utf-8") if old.is_file() else ""
    lines += "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    try:
        new.write_text(lines, encoding="utf-8")
        fsync_path(new)
    except OSError as exc:
        raise write_failure(old, f"the new source index (in {new.parent.parent})", exc) from None


def _link_tree(source: Path, target: Path) -> None:
    """Mirror ``source`` at ``target`` with hard links (copies where links fail), symlinks as symlinks.

    Strings and ``os.scandir``: this runs once per image at every ingest.
    """
    target.mkdir()
    if not source.is_dir():
        return
    pending = [(str(source), str(target))]
    while pending:
        folder, mirror = pending.pop()
        with os.scandir(folder) as listing:
            for entry in listing:
                copy = os.path.join(mirror, entry.name)
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), copy)
                elif entry.is_dir():
                    os.mkdir(copy)
                    pending.append((entry.path, copy))
                elif mirror == str(target) and entry.name == INDEX_NAME:
                    continue
                else:
                    try:
                        os.link(entry.path, copy)
                    except OSError:
                        shutil.copy2(entry.path, copy)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # kernel or file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(second))
