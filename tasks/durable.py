"""Make a write survive a power cut before the step that depends on it; tell cheaply what changed.

Caches are read back without trust: a missing or damaged file reads as empty, never as an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

_HASH_CHUNK = 1 << 20


class StatKey(NamedTuple):
    """What a file's recorded sha256 is trusted by: it holds while all four are as recorded.

    The ctime is what catches a rewrite that sets the mtime back; the inode, a file
    replaced by another one.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def stat_key(info: os.stat_result) -> StatKey:
    """The ``StatKey`` of a file from its ``stat`` (a symlink's target, if followed)."""
    return StatKey(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def stat_rows(rows: Any, values: int) -> dict[str, list] | None:
    """A cache's rows ``{path: [*StatKey, then `values` more]}`` as read, or None if any row is not so.

    Only the shape is checked: a damaged stat value never equals a file's stat, so that
    file is read again.
    """
    width = len(StatKey._fields) + values
    if not isinstance(rows, dict) or any(not isinstance(row, list) or len(row) != width for row in rows.values()):
        return None
    return rows


def stat_hashes(rows: dict[str, list], sha256_at: int) -> dict[str, tuple[StatKey, str]]:
    """path -> (StatKey when read, sha256) of ``stat_rows``; a row without a sha256 is left out."""
    return {
        path: (StatKey(*row[: len(StatKey._fields)]), row[sha256_at])
        for path, row in rows.items() if isinstance(row[sha256_at], str)
    }


def fsync_path(path: Path | str) -> None:
    """Flush a file's bytes, or a folder's entries (a rename into it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_replace(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``target`` for the block to write; then fsync, rename, fsync the folder.

    Readers see the old file or the new one, never a part; on any failure the temp file
    is removed and the old file is untouched. ``suffix`` keeps a format told by the name
    (Keras saves ``.h5`` by the path's ending).
    """
    descriptor, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        fsync_path(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` whole or not at all (see ``atomic_replace``)."""
    with atomic_replace(target) as temp, temp.open("wb") as handle:
        write(handle)


def write_json(target: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON, written whole or not at all (its folder made if missing).

    ``indent=None`` for a cache: no person reads it, and one line is a quarter smaller.
    """
    text = (json.dumps(data, indent=indent) + "\n").encode("utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda handle: handle.write(text))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} if the file is missing, unreadable, damaged or not an object.

    For caches: whatever is wrong with one, the caller works from the files instead.
    """
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def details_path(metrics_path: Path) -> Path:
    """Where a stage keeps its whole record beside its DVC metrics file (gate-details.json)."""
    return metrics_path.with_name(f"{metrics_path.stem}-details{metrics_path.suffix}")


def write_stage_report(metrics_path: Path, record: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The few numbers ``dvc metrics diff`` compares, and the whole record beside them."""
    write_json(details_path(metrics_path), record)
    write_json(metrics_path, metrics)


def replace_path(staged: Path, target: Path) -> None:
    """Put a written file or folder at ``target`` (same file system), replacing what was there."""
    if staged.is_file():
        os.replace(staged, target)
    else:
        # A folder cannot be swapped in one step: move the old one aside first.
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_file_stats(digest: Any, path: Path, name: str) -> None:
    """Feed (name, size, mtime, inode) of a file, or of every file under a folder, to ``digest``.

    The key DVC's own state database trusts: no file is read. Names are ``name`` plus the
    path below ``path``, whatever the caller's spelling of it (absolute, ``./data``).
    """
    def add(relative: str, stat: Callable[[], os.stat_result]) -> None:
        try:
            info = stat()
        except OSError:  # missing, or a broken link: DVC decides what it means
            digest.update(f"{relative}\0missing\n".encode())
            return
        digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}\n".encode())

    if not path.is_dir():
        add(name, path.stat)
        return
    pending = [str(path)]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in sorted(listing, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    add(name + entry.path[len(str(path)):], entry.stat)


def cache_file(cache_dir: Path | str, data_dir: Path | str, kind: str) -> Path:
    """One cache file of each kind per data folder, named by the folder's absolute path."""
    tag = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{tag}.json"
