"""One row per file of a data set: what Pillow says about it, hashed and cached.

``inspect_file`` never raises on a bad image: the row's ``error`` says why it cannot be
used (zero-byte, truncated, not an image, decompression bomb, animated). The verdict
itself is ``tasks.data.image_check``'s, the one check that ``fanaoi ingest``, ``fanaoi
predict`` and the HTTP service use as well.

``build_manifest`` walks a data folder the way training reads it (class folders searched
recursively, hidden files skipped, symlinked folders not followed) and adds a row for
everything training would skip or refuse, so the validate stage can name each one.
Inspections are cached by (path, size, mtime): re-validating after a night's batch
decodes only the new files. Each row also keeps the file's ctime and inode as they were
when it was read: ``fanaoi ingest`` trusts a row's sha256 only while those match too
(``cached_hashes``), since a rewrite that sets the mtime back cannot set the ctime back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from tasks.data.dataset import assign_split, defect_type_of, is_candidate_file, walk_files
from tasks.data.image_check import ALWAYS_BLOCKING, blocking_rules, inspect_image
from tasks.durable import StatKey, cache_file, read_json, stat_hashes, stat_key, stat_rows, write_json
from tasks.params import DataParams, ValidateParams

log = logging.getLogger(__name__)

# What a manifest row is: an image of a class, or something training skips or refuses.
IMAGE = "image"
OTHER_FILE = "other_file"  # in a class folder, not an image file: training skips it
LOOSE_FILE = "loose_file"  # beside the class folders: training ignores it
UNEXPECTED_FOLDER = "unexpected_folder"  # not a class: training refuses the data set
OUTSIDE_LINK = "outside_link"  # symlink leading out of the data folder

_CACHE_VERSION = 5
_FILES_PER_WORKER = 1000  # below this, starting a worker process (~1 s) costs more than it saves

# dHash: compare neighbouring pixels of a 17x16 grayscale thumbnail -> 256 bits. The usual
# 64-bit (9x8) hash cannot tell two AOI photos apart: one camera, one pose, one part, so
# on the demo set a third of the validation images were "near-duplicates" of some train
# image. At 256 bits distinct fans are 10 or more bits apart and a re-encoded or
# re-lit copy of an image is typically within 8.
_DHASH_SIZE = (17, 16)


@dataclass(frozen=True)
class FileCheck:
    path: Path
    bytes: int
    sha256: str | None
    width: int | None
    height: int | None
    mode: str | None
    format: str | None
    decodable: bool | None  # None: a blocking header rule (format, mode, size) stopped it first
    error: str | None
    dhash: str | None = None  # 64 hex digits, difference hash for near-duplicate search
    brightness: float | None = None  # mean grayscale intensity, 0..255


def inspect_file(path: Path, limits: ValidateParams) -> FileCheck:
    """Read and hash one file, then judge its bytes with the shared image check."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _failed(path, 0, None, f"cannot read the file ({exc.strerror or exc})")
    return check_bytes(path, data, limits)


def check_bytes(path: Path, data: bytes, limits: ValidateParams) -> FileCheck:
    """The manifest row of ``data`` (read from ``path``): tasks.data.image_check decides.

    A file stopped by a blocking header rule (format, mode, size) is not decoded:
    ``decodable`` is None and the rule's own expectation names it. A file that cannot be
    decoded has ``decodable`` False and ``error`` says why.
    """
    digest = hashlib.sha256(data).hexdigest()
    found = inspect_image(data, limits)
    unreadable = next((p for p in found.problems if p.rule in ALWAYS_BLOCKING), None)
    if unreadable is not None:  # named once, by "readable": no header fields to trip others
        return _failed(path, len(data), digest, unreadable.reason)
    if found.image is None:
        return FileCheck(
            path, len(data), digest, found.width, found.height, found.mode, found.format,
            None, None,
        )
    image = found.image
    gray = image.convert("L")
    pixels = np.asarray(gray.resize(_DHASH_SIZE, Image.Resampling.BOX), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return FileCheck(
        path=path,
        bytes=len(data),
        sha256=digest,
        width=image.width,
        height=image.height,
        mode=image.mode,
        format=image.format,
        decodable=True,
        error=None,
        dhash=np.packbits(bits).tobytes().hex(),
        brightness=round(float(np.asarray(gray).mean()), 3),
    )


def _failed(path: Path, size: int, digest: str | None, error: str) -> FileCheck:
    return FileCheck(path, size, digest, None, None, None, None, False, error)


_CHECK_COLUMNS = [f.name for f in dataclasses.fields(FileCheck) if f.name != "path"]
_STAT_FIELDS = len(StatKey._fields)  # a cached row is the file's StatKey, then the check
_SHA256 = _STAT_FIELDS + _CHECK_COLUMNS.index("sha256")
_NO_STAT = StatKey(-1, -1, -1, -1)  # a broken link has none; its row says why it cannot be read


@dataclass(frozen=True)
class _Entry:
    path: str
    relative: str
    kind: str
    class_name: str | None
    detail: str | None = None  # link target, or what an unexpected folder holds
    stat: StatKey = _NO_STAT  # of an image, when it was walked


def build_manifest(
    data_dir: Path | str, data: DataParams, limits: ValidateParams,
    cache_dir: Path | str | None = None,
) -> pd.DataFrame:
    """One row per entry of the data folder, sorted by path; images inspected or cached.

    Columns: path (relative, '/'-separated), kind, class_name, split, detail, the
    fields of FileCheck, and defect_type (images of the positive class only).
    ``attrs["inspected"]`` counts the files decoded this time.
    """
    data_dir = Path(data_dir)
    entries = list(_walk_data_folder(data_dir, data))
    cache_path = cache_file(cache_dir, data_dir, "manifest") if cache_dir is not None else None
    cached = _load_cache(cache_path, limits) if cache_path else {}
    # relative path -> [size, mtime_ns, ctime_ns, inode, *FileCheck fields]: lists keep the
    # cache compact
    checks: dict[str, list] = {}
    new = []
    for entry in entries:
        if entry.kind != IMAGE:
            continue
        hit = cached.get(entry.relative)
        if hit is None or not _same_content(StatKey(*hit[:_STAT_FIELDS]), entry.stat):
            new.append(entry)
        else:
            checks[entry.relative] = hit
    for entry, check in zip(new, _inspect_all([Path(e.path) for e in new], limits), strict=True):
        checks[entry.relative] = [*entry.stat, *(getattr(check, name) for name in _CHECK_COLUMNS)]
    inspected = len(new)
    if cache_path and (inspected or len(checks) != len(cached)):
        _save_cache(cache_path, limits, checks)
    frame = _to_frame(entries, checks, data)
    frame.attrs["inspected"] = inspected
    log.info("manifest of %s: %d entries, %d inspected, %d from cache",
             data_dir, len(frame), inspected, len(checks) - inspected)
    return frame


def _same_content(cached: StatKey, now: StatKey) -> bool:
    """A row is reused on (size, mtime): an ingest's hard links move the ctime of every file.

    The row keeps the ctime and inode it was read with, so ``cached_hashes`` stays strict.
    """
    return (cached.size, cached.mtime_ns) == (now.size, now.mtime_ns)


def _inspect_all(paths: list[Path], limits: ValidateParams) -> list[FileCheck]:
    """``inspect_file`` of each path, on every core when there are enough of them.

    A cold validation of 100,000 images is a few minutes of decoding on one core. Workers
    are spawned, not forked: the caller may hold Prefect or TensorFlow threads.
    """
    workers = min(os.cpu_count() or 1, len(paths) // _FILES_PER_WORKER)
    if workers < 2:
        return [inspect_file(path, limits) for path in paths]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(inspect_file, paths, repeat(limits), chunksize=256))


def _to_frame(entries: list[_Entry], checks: dict[str, list], data: DataParams) -> pd.DataFrame:
    missing = [None] * (_STAT_FIELDS + len(_CHECK_COLUMNS))
    rows = [
        [entry.relative, entry.kind, entry.class_name, entry.detail,
         *checks.get(entry.relative, missing)[_STAT_FIELDS:]]
        for entry in entries
    ]
    frame = pd.DataFrame(rows, columns=["path", "kind", "class_name", "detail", *_CHECK_COLUMNS])
    frame.insert(3, "split", [
        assign_split(sha, data.split_salt, data.split) if isinstance(sha, str) else None
        for sha in frame["sha256"]
    ])
    frame["decodable"] = frame["decodable"].astype("boolean")
    frame["defect_type"] = [
        defect_type_of(path, data.positive_class) if kind == IMAGE else None
        for path, kind in zip(frame["path"], frame["kind"], strict=True)
    ]
    return frame.sort_values("path", ignore_index=True)


def _walk_data_folder(data_dir: Path, data: DataParams) -> Iterator[_Entry]:
    """Top level: class folders are searched, anything else is one row of its own."""
    root = data_dir.resolve()
    with os.scandir(data_dir) as listing:
        top = sorted(listing, key=lambda e: e.name)
    for entry in top:
        if not is_candidate_file(entry):
            continue
        if entry.is_symlink() and not _is_inside(entry.path, root):
            yield _Entry(entry.path, entry.name, OUTSIDE_LINK, None, os.path.realpath(entry.path))
        elif entry.is_dir() and entry.name in data.classes:
            yield from _walk_class_folder(entry.path, entry.name, root, data)
        elif entry.is_dir():
            count = sum(len(files) for _, _, files in os.walk(entry.path))
            yield _Entry(entry.path, entry.name + "/", UNEXPECTED_FOLDER, None, f"{count} file(s)")
        else:
            yield _Entry(entry.path, entry.name, LOOSE_FILE, None)


def _walk_class_folder(
    folder: str, class_name: str, root: Path, data: DataParams
) -> Iterator[_Entry]:
    extensions = {e.lower() for e in data.extensions}
    for entry, relative in walk_files(folder, class_name):
        if entry.is_symlink() and not _is_inside(entry.path, root):
            target = os.path.realpath(entry.path)
            yield _Entry(entry.path, relative, OUTSIDE_LINK, class_name, target)
        else:
            yield from _class_file(entry, relative, class_name, extensions)


def _class_file(
    entry: os.DirEntry, relative: str, class_name: str, extensions: set[str]
) -> Iterator[_Entry]:
    try:
        info = entry.stat()
    except OSError:  # a broken link: inspecting it reports the read error
        yield _Entry(entry.path, relative, IMAGE, class_name)
        return
    if stat.S_ISDIR(info.st_mode):
        return  # a symlinked folder: training does not follow it either
    suffix = os.path.splitext(entry.name)[1].lower()
    if not stat.S_ISREG(info.st_mode) or suffix not in extensions:
        yield _Entry(entry.path, relative, OTHER_FILE, class_name)
        return
    yield _Entry(entry.path, relative, IMAGE, class_name, stat=stat_key(info))


def _is_inside(path: str, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(root)


def cached_hashes(cache_dir: Path | str, data_dir: Path | str) -> dict[str, tuple[StatKey, str]]:
    """relative path -> (StatKey when read, sha256) of the last validation.

    The sha256 of a row does not depend on the limits the rows were judged by, so any
    cache of this layout serves, whatever its limits or Pillow version.
    """
    stored = read_json(cache_file(cache_dir, data_dir, "manifest"))
    header = stored.get("header")
    if not isinstance(header, dict) or header.get("version") != _CACHE_VERSION:
        return {}
    return stat_hashes(_rows(stored), _SHA256)


def _load_cache(path: Path, limits: ValidateParams) -> dict[str, list]:
    """Rows of an earlier run, or nothing if the file is missing, stale or damaged."""
    stored = read_json(path)
    return _rows(stored) if stored.get("header") == _cache_header(limits) else {}


def _rows(stored: dict) -> dict[str, list]:
    return stat_rows(stored.get("files"), len(_CHECK_COLUMNS)) or {}


def _save_cache(path: Path, limits: ValidateParams, checks: dict[str, list]) -> None:
    """Write whole or not at all, so a killed run leaves the old cache whole."""
    write_json(path, {"header": _cache_header(limits), "files": checks}, indent=None)


def _cache_header(limits: ValidateParams) -> dict:
    # New limits (they decide which files are decoded) or a new Pillow may change verdicts.
    return {
        "version": _CACHE_VERSION, "max_pixels": limits.max_pixels,
        "formats": list(limits.formats), "modes": list(limits.modes),
        "sides": [limits.min_side, limits.max_side], "blocking": sorted(blocking_rules(limits)),
        "pillow": PIL.__version__,
    }
