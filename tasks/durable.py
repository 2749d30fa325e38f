"""Make a write survive a power cut before the step that depends on it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path | str) -> None:
    """Flush a file's bytes, or a folder's entries (a rename into it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` via a temp file in the same folder, fsync, then ``os.replace``.

    Readers see the old file or the new one, never a part; on any failure the temp file
    is removed and the old file is untouched.
    """
    descriptor, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def cache_file(cache_dir: Path | str, data_dir: Path | str, kind: str) -> Path:
    """One cache file of each kind per data folder, named by the folder's absolute path."""
    tag = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{tag}.json"
