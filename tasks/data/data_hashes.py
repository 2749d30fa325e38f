"""The sha256 of every file already in the data folder, for the ingest's duplicate check.

At 100,000 images, reading them all is most of an ingest's own time. A file whose (size,
mtime, ctime, inode) are those it had when validation or an earlier ingest read it keeps
that sha256 (the manifest cache, and the ingest's own record under ``validate.cache_dir``);
any other file is read again. The ctime is what catches a rewrite that sets the mtime back.
The hard links of the ingest's new folder move every old file's ctime, so each ingest
records the tree it swapped in, with the sha256 it had just checked.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.data.dataset import walk_files
from tasks.data.manifest import cached_hashes
from tasks.durable import (
    StatKey,
    cache_file,
    read_json,
    sha256_of,
    stat_hashes,
    stat_key,
    stat_rows,
    write_json,
)

if TYPE_CHECKING:
    from tasks.data.ingest_transaction import AddedFile

log = logging.getLogger(__name__)

_HASHES_VERSION = 1
_SHA256 = len(StatKey._fields)  # a recorded row is the file's StatKey, then its sha256


@dataclass
class DataHashes:
    """The files already in the class folders, by content and by path."""

    by_sha256: dict[str, list[tuple[str, str]]]  # sha256 -> [(class, path from the repository)]
    files: dict[str, tuple[StatKey, str]]  # path in the data folder -> (stat key when read, sha256)
    read: int  # files whose bytes were read this time


def existing_hashes(
    data_dir: Path, classes: tuple[str, ...], data_rel: str,
    known: dict[str, tuple[StatKey, str]] | None = None,
) -> DataHashes:
    """Every file already in the class folders with its sha256, from ``known`` where it still holds.

    ``known`` maps a path in the data folder to the stat key it had when it was hashed; a
    file whose key differs, or that ``known`` does not list, is read.
    """
    known = known or {}
    found = DataHashes(defaultdict(list), {}, 0)
    for name, relative, info in _class_files(data_dir, classes):
        key = stat_key(info)
        known_key, sha256 = known.get(relative, (None, None))
        if known_key != key:
            sha256 = sha256_of(data_dir / relative)
            found.read += 1
        found.files[relative] = (key, sha256)
        found.by_sha256[sha256].append((name, f"{data_rel}/{relative}"))
    # Verdicts name the first copy: class order, then path order, whatever the walk's order.
    order = {name: index for index, name in enumerate(classes)}
    for copies in found.by_sha256.values():
        if len(copies) > 1:
            copies.sort(key=lambda copy: (order[copy[0]], copy[1].split("/")))
    return found


def known_hashes(hashes_dir: Path, data_dir: Path) -> dict[str, tuple[StatKey, str]]:
    """The sha256 recorded per file by the last validation and the last ingest (the ingest's if both)."""
    known = cached_hashes(hashes_dir, data_dir)
    path = cache_file(hashes_dir, data_dir, "ingest-hashes")
    stored = read_json(path)
    if stored.get("version") != _HASHES_VERSION:
        return known
    rows = stat_rows(stored.get("files"), 1)
    if rows is None:  # those files are read instead
        log.warning("%s: damaged, ignored", path)
    else:
        known.update(stat_hashes(rows, _SHA256))
    return known


def record_hashes(
    hashes_dir: Path, data_dir: Path, classes: tuple[str, ...], before: DataHashes,
    accepted: list[AddedFile],
) -> None:
    """Record the sha256 of every file of the folder just swapped in, under its new stat key.

    An old file keeps the sha256 checked before the swap while its size, mtime and inode
    are unchanged (its hard link moved only the ctime); an accepted file has the sha256
    its copy was checked against. Anything else is left out, so the next ingest reads it.
    """
    added = {file.place.as_posix(): file.sha256 for file in accepted}
    files = {}
    for _, relative, info in _class_files(data_dir, classes):
        key = stat_key(info)
        old_key, sha256 = before.files.get(relative, (None, None))
        if old_key is not None and (old_key.size, old_key.mtime_ns, old_key.inode) == (
            key.size, key.mtime_ns, key.inode
        ):
            files[relative] = [*key, sha256]
        elif relative in added:
            files[relative] = [*key, added[relative]]
    path = cache_file(hashes_dir, data_dir, "ingest-hashes")
    try:
        write_json(path, {"version": _HASHES_VERSION, "files": files}, indent=None)
    except OSError as exc:  # only a cache: the next ingest reads the files instead
        log.warning("%s: cannot record the data set's hashes (%s)", path, exc.strerror or exc)


def _class_files(data_dir: Path, classes: tuple[str, ...]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(class, path in the data folder, stat) of each file of the class folders, as training
    lists them (``walk_files``); a symlinked file counts as its target, a broken one not at all.
    """
    for name in classes:
        for entry, relative in walk_files(str(data_dir / name), name):
            try:
                info = entry.stat()
            except OSError:  # a broken link: not a file training could read
                continue
            if stat.S_ISREG(info.st_mode):
                yield name, relative, info
