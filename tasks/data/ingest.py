"""Ingest a labeled batch into the data set: a verdict per file, content-hash names, atomic.

A batch is laid out like the data set (one folder per class). Every file is read once,
without following symlinks, and judged by the one image check of the pipeline
(``tasks.data.image_check`` with the blocking limits of ``validate`` in params). The copy is
read again the same way and must hash to the judged bytes, so what enters the data set
is exactly what was checked. Accepted files are copied to
``data/<class>/<sha256><ext>`` (``data/NG/<type>/<sha256><ext>`` from a defect-type
subfolder ``NG/<type>/`` of the batch); their origin goes to ``data/.sources.jsonl``, hidden so
training and validation skip it, yet inside the DVC snapshot, so checking out an older
snapshot restores the matching index. Originals are only read, never moved or deleted.

The new data folder is built beside the old one (hard links to the files already there,
copies of the accepted ones) and swapped in with one rename: an ingest interrupted at
any point leaves ``data/`` as it was or complete. Then ``dvc add`` and ``dvc push``.

The duplicate check needs the sha256 of every file already in ``data/``: at 100,000 images,
reading them all is most of an ingest's own time. A file whose (size, mtime, ctime, inode)
are those it had when validation or an earlier ingest read it keeps that sha256 (the
manifest cache, and the ingest's own record under ``validate.cache_dir``); any other file
is read again. The ctime is what catches a rewrite that sets the mtime back. The hard
links of the new folder move every old file's ctime, so each ingest records the tree it
swapped in, with the sha256 it had just checked.
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
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.data.dataset import UNTYPED, defect_type_of, is_candidate_file, walk_files
from tasks.data.image_check import ALWAYS_BLOCKING, blocking_rules, inspect_image
from tasks.data.manifest import cached_hashes
from tasks.data.snapshot import (
    SnapshotError,
    commit_command,
    commit_message,
    commit_snapshot,
    require_dvc_repo,
    snapshot_data,
)
from tasks.durable import (
    StatKey,
    cache_file,
    fsync_path,
    read_json,
    sha256_of,
    stat_hashes,
    stat_key,
    stat_rows,
    write_json,
)
from tasks.errors import FanaoiError
from tasks.params import Params, ValidateParams
from tasks.project_lock import held_lock

log = logging.getLogger(__name__)

INDEX_NAME = ".sources.jsonl"
STAGING_PREFIX = ".fanaoi-ingest-"
LOCK_NAME = ".fanaoi-ingest.lock"
COMPLETE_MARKER = "complete"

ACCEPTED = "accepted"
DUPLICATE = "duplicate"  # the same bytes are already in the data set, same class
DUPLICATE_IN_BATCH = "duplicate_in_batch"
LABEL_CONFLICT = "label_conflict"  # the same bytes under the other class
UNREADABLE = "unreadable"  # empty, truncated, not an image, decompression bomb
INVALID = "invalid"  # decodes, but format, mode or size break a blocking validate limit
UNEXPECTED = "unexpected"  # not an image file, outside a class folder, a symlink
IGNORED = "ignored"  # hidden files such as .DS_Store
REJECTED = (LABEL_CONFLICT, UNREADABLE, INVALID, UNEXPECTED)
_COPY_CHUNK = 1 << 20
_HASHES_VERSION = 1
_SHA256 = len(StatKey._fields)  # a recorded row is the file's StatKey, then its sha256


class IngestError(FanaoiError):
    """The batch cannot be ingested as given; the message names the path and the fix."""


@dataclass
class Verdict:
    path: str
    class_name: str | None
    verdict: str
    reason: str = ""
    sha256: str | None = None
    stored_as: str | None = None
    defect_type: str | None = None  # tasks.data.dataset.defect_type_of, from the path in the batch


def ingest_batch(
    batch_dir: Path | str,
    params: Params,
    repo_dir: Path | str = ".",
    *,
    push: bool = True,
    commit: bool = False,
    reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Judge every file of the batch, add the accepted ones to data/, snapshot with DVC.

    Returns the report (also written as JSON under ``reports/ingest/``): counts, the
    snapshot, and one verdict per file.
    """
    repo_dir, batch_dir = Path(repo_dir).resolve(), Path(batch_dir)
    data_dir = (repo_dir / params.data.dir).resolve()
    data_rel = _inside_repo(data_dir, repo_dir)
    _check_batch_location(batch_dir, data_dir)
    require_dvc_repo(repo_dir)
    started = datetime.now(UTC)
    hashes_dir = repo_dir / params.validate.cache_dir
    with ingest_lock(data_dir):
        recover_interrupted(data_dir, report)
        in_data = existing_hashes(data_dir, params.data.classes, data_rel, known_hashes(hashes_dir, data_dir))
        log.info("%s: sha256 of %d file(s) read, %d known from the last validation or ingest",
                 data_rel, in_data.read, len(in_data.files) - in_data.read)
        verdicts = judge_batch(batch_dir, data_dir, params, data_rel, in_data)
        result = _summary(batch_dir, data_rel, started, verdicts)
        path = report_path(Path(reports_dir) if reports_dir else repo_dir / "reports" / "ingest",
                           started, batch_dir)
        result["report_path"] = str(path)
        # The verdicts are on disk before data/ changes: a failure here changes nothing.
        write_report(result, path)
        accepted = [v for v in verdicts if v.verdict == ACCEPTED]
        if accepted:
            try:
                add_to_data(data_dir, accepted, _index_entries(accepted, batch_dir, started))
            except FanaoiError as exc:
                result["error"] = str(exc)
                write_report(result, path)
                raise
            report(f"added {len(accepted)} image(s) to {data_rel}/")
        record_hashes(hashes_dir, data_dir, params.data.classes, in_data, accepted)
    try:
        _snapshot(result, repo_dir, data_dir, push, commit, stamp_dir=params.validate.cache_dir)
    except SnapshotError as exc:
        result["snapshot_error"] = str(exc)
        raise SnapshotError(
            f"{exc}. The verdicts are in {path}; {data_rel}/ holds the accepted files: "
            f"rerun the ingest once fixed (it adds nothing twice and retries the snapshot)",
            command=exc.command, transient=exc.transient,
        ) from None
    finally:
        write_report(result, path)
    return result


def _snapshot(result: dict[str, Any], repo_dir: Path, data_dir: Path, push: bool,
              commit: bool, *, stamp_dir: str) -> None:
    """``dvc add`` + ``dvc push`` even when nothing was accepted: a rerun heals a failed push."""
    data_rel = result["data_dir"]
    if not data_dir.is_dir():
        result["snapshot"] = None
        return
    snapshot = snapshot_data(repo_dir, data_rel, push=push, stamp_dir=stamp_dir)
    result["snapshot"] = snapshot
    result["commit_command"] = commit_command(data_rel, snapshot["md5"])
    detail = f"ingest {Path(result['batch']).name}, {result['accepted']} image(s) added"
    result["committed"] = commit and commit_snapshot(
        repo_dir, commit_message(snapshot["md5"], detail), data_rel
    )


@dataclass(frozen=True)
class CheckedFile:
    """One batch file as read once (without following a symlink) and judged."""

    path: Path
    class_name: str
    sha256: str | None
    problem: tuple[str, str] | None  # (verdict, reason) when the file is refused


def judge_batch(
    batch_dir: Path, data_dir: Path, params: Params, data_rel: str, in_data: DataHashes | None = None,
) -> list[Verdict]:
    """One verdict per file (or unexpected folder) of the batch; reads, never writes.

    ``in_data`` is what ``existing_hashes`` found in the data folder (read in full if None).
    """
    verdicts, candidates = walk_batch(batch_dir, params.data.classes, params.data.extensions)
    checked = [check_batch_file(path, name, params.validate) for path, name in candidates]
    if in_data is None:
        in_data = existing_hashes(data_dir, params.data.classes, data_rel)
    in_batch: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for check in checked:
        if check.problem is None:
            in_batch[check.sha256].append((check.class_name, str(check.path)))
    types = {str(path): defect_type_of(path.relative_to(batch_dir), params.data.positive_class)
             for path, _ in candidates}
    for check in checked:
        verdicts.append(_judge_file(
            check, in_data=in_data.by_sha256, in_batch=in_batch, data_rel=data_rel,
            defect_type=types[str(check.path)],
        ))
    return verdicts


def check_batch_file(path: Path, class_name: str, limits: ValidateParams) -> CheckedFile:
    """Read the file once (a symlink is refused, not followed), hash it, run the image check."""
    try:
        data = read_no_follow(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return CheckedFile(path, class_name, None, (UNEXPECTED, "symlink; copy the file itself"))
        return CheckedFile(path, class_name, None,
                           (UNREADABLE, f"cannot read the file ({exc.strerror or exc})"))
    found = inspect_image(data, limits)
    problem = found.rejection(blocking_rules(limits))
    verdict = None
    if problem is not None:
        verdict = (UNREADABLE if problem.rule in ALWAYS_BLOCKING else INVALID, problem.reason)
    return CheckedFile(path, class_name, hashlib.sha256(data).hexdigest(), verdict)


def read_no_follow(path: Path) -> bytes:
    """The bytes of a regular file; a symlink fails with ELOOP (``O_NOFOLLOW``)."""
    descriptor = open_no_follow(path)
    with os.fdopen(descriptor, "rb") as handle:
        return handle.read()


def open_no_follow(path: Path) -> int:
    """A read descriptor on ``path`` itself: never a symlink's target, never a FIFO or device."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return descriptor


def walk_batch(
    batch_dir: Path, classes: tuple[str, ...], extensions: tuple[str, ...]
) -> tuple[list[Verdict], list[tuple[Path, str]]]:
    """Verdicts for what is not a candidate image, and the (path, class) candidates."""
    if not batch_dir.is_dir():
        raise IngestError(
            f"{batch_dir}: batch folder not found; give a folder with one subfolder per class "
            f"({', '.join(classes)})"
        )
    verdicts: list[Verdict] = []
    candidates: list[tuple[Path, str]] = []
    for entry in sorted(batch_dir.iterdir()):
        if entry.name.startswith("."):
            verdicts.append(Verdict(str(entry), None, IGNORED, "hidden"))
        elif entry.is_symlink():
            verdicts.append(Verdict(str(entry), None, UNEXPECTED, "symlink; copy the file itself"))
        elif entry.is_dir() and entry.name in classes:
            _walk_class_folder(entry, extensions, verdicts, candidates)
        elif entry.is_dir():
            verdicts.append(Verdict(
                str(entry), None, UNEXPECTED,
                f"folder is not a class ({', '.join(classes)}); rename it or move its files "
                f"into a class folder",
            ))
        else:
            verdicts.append(Verdict(
                str(entry), None, UNEXPECTED,
                f"file beside the class folders; move it into one of {', '.join(classes)}",
            ))
    return verdicts, candidates


def _walk_class_folder(
    folder: Path, extensions: tuple[str, ...], verdicts: list[Verdict],
    candidates: list[tuple[Path, str]],
) -> None:
    allowed = {e.lower() for e in extensions}
    for root, dirs, files in os.walk(folder):  # does not follow symlinked folders
        dirs.sort()
        for name in [d for d in dirs if d.startswith(".") or Path(root, d).is_symlink()]:
            dirs.remove(name)
            hidden = name.startswith(".")
            verdicts.append(Verdict(
                str(Path(root, name)), folder.name, IGNORED if hidden else UNEXPECTED,
                "hidden" if hidden else "symlink; copy the folder itself",
            ))
        for name in sorted(files):
            path = Path(root, name)
            if not is_candidate_file(path):
                verdicts.append(Verdict(str(path), folder.name, IGNORED, "hidden"))
            elif path.is_symlink():
                verdicts.append(Verdict(str(path), folder.name, UNEXPECTED,
                                        "symlink; copy the file itself"))
            elif path.suffix.lower() not in allowed:
                verdicts.append(Verdict(
                    str(path), folder.name, UNEXPECTED,
                    f"not an image file: extension {path.suffix or '(none)'} is not one of "
                    f"{', '.join(sorted(allowed))} (data.extensions)",
                ))
            else:
                candidates.append((path, folder.name))


def _judge_file(
    check: CheckedFile, *, in_data: dict[str, list[tuple[str, str]]],
    in_batch: dict[str, list[tuple[str, str]]], data_rel: str, defect_type: str | None = None,
) -> Verdict:
    name = check.class_name
    verdict = Verdict(str(check.path), name, ACCEPTED, sha256=check.sha256, defect_type=defect_type)
    if check.problem is not None:
        verdict.verdict, verdict.reason = check.problem
        return verdict
    conflicts = [f"{path} (labeled {other})" for other, path in in_data.get(check.sha256, [])
                 + in_batch[check.sha256] if other != name]
    present = [path for other, path in in_data.get(check.sha256, []) if other == name]
    first_in_batch = next(path for other, path in in_batch[check.sha256] if other == name)
    if conflicts:
        verdict.verdict = LABEL_CONFLICT
        verdict.reason = f"labeled {name} here, but the same bytes are " + ", ".join(conflicts)
    elif present:
        verdict.verdict, verdict.reason = DUPLICATE, f"already in the data set as {present[0]}"
    elif first_in_batch != str(check.path):
        verdict.verdict, verdict.reason = DUPLICATE_IN_BATCH, f"same bytes as {first_in_batch}"
    else:
        stored = Path(data_rel, name, type_folder(defect_type), f"{check.sha256}{check.path.suffix.lower()}")
        verdict.stored_as = stored.as_posix()
    return verdict


def type_folder(defect_type: str | None) -> str:
    """Where in its class folder an accepted image goes: its defect type's subfolder, or ""."""
    return "" if defect_type in (None, UNTYPED) else defect_type


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
    accepted: list[Verdict],
) -> None:
    """Record the sha256 of every file of the folder just swapped in, under its new stat key.

    An old file keeps the sha256 checked before the swap while its size, mtime and inode
    are unchanged (its hard link moved only the ctime); an accepted file has the sha256
    its copy was checked against. Anything else is left out, so the next ingest reads it.
    """
    added = {_in_data(v).as_posix(): v.sha256 for v in accepted}
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


def add_to_data(data_dir: Path, accepted: list[Verdict], index_entries: list[dict]) -> None:
    """Build the new data folder beside the old one, then swap it in with one rename."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=data_dir.parent))
    try:
        new_tree = staging / "new"
        _link_tree(data_dir, new_tree)
        for verdict in accepted:
            target = new_tree / _in_data(verdict)
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_checked(Path(verdict.path), target, verdict.sha256)
        _write_index(data_dir / INDEX_NAME, new_tree / INDEX_NAME, index_entries)
        fsync_path(staging)
        (staging / COMPLETE_MARKER).touch()
        swap_in(new_tree, data_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _in_data(accepted: Verdict) -> Path:
    """Where an accepted file goes, inside the data folder."""
    return Path(accepted.class_name, type_folder(accepted.defect_type), Path(accepted.stored_as).name)


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


def report_path(folder: Path, started: datetime, batch_dir: Path) -> Path:
    """reports/ingest/<UTC time>-<batch name>.json, never overwriting an earlier report."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{batch_dir.resolve().name}"
    path, suffix = folder / f"{stem}.json", 2
    while path.exists():
        path, suffix = folder / f"{stem}-{suffix}.json", suffix + 1
    return path


def write_report(result: dict[str, Any], path: Path) -> None:
    """Write the report whole or not at all; a failure names the file and leaves data/ alone."""
    try:
        write_json(path, result)
    except OSError as exc:
        raise _write_failure(path, "the ingest report", exc) from None


def _write_failure(path: Path, what: str, exc: OSError) -> IngestError:
    """A write that failed before data/ was swapped: name the file, say nothing was added."""
    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return IngestError(
        f"{path}: cannot write {what} ({exc.strerror or exc}); nothing was added to the data "
        f"set. {'Free space on that disk' if full else 'Fix the folder'}, then rerun the ingest",
        transient=full,
    )


def rejected_count(result: dict[str, Any]) -> int:
    return sum(result["counts"].get(verdict, 0) for verdict in REJECTED)


def _summary(batch_dir: Path, data_rel: str, started: datetime, verdicts: list[Verdict]) -> dict:
    counts = Counter(v.verdict for v in verdicts)
    return {
        "batch": str(batch_dir.resolve()),
        "data_dir": data_rel,
        "started": started.isoformat(timespec="seconds"),
        "counts": dict(sorted(counts.items())),
        "accepted": counts[ACCEPTED],
        "rejected": sum(counts[v] for v in REJECTED),
        "files": [asdict(v) for v in verdicts],
    }


def _index_entries(accepted: list[Verdict], batch_dir: Path, started: datetime) -> list[dict]:
    batch = str(batch_dir.resolve())
    when = started.isoformat(timespec="seconds")
    return [
        {"file": v.stored_as, "class": v.class_name, "sha256": v.sha256,
         "source": str(Path(v.path).resolve()), "batch": batch, "ingested_at": when}
        for v in accepted
    ]


def _write_index(old: Path, new: Path, entries: list[dict]) -> None:
    # A fresh file, never the hard link to the old one: the old folder must stay as it was.
    lines = old.read_text(encoding="utf-8") if old.is_file() else ""
    lines += "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    try:
        new.write_text(lines, encoding="utf-8")
        fsync_path(new)
    except OSError as exc:
        raise _write_failure(old, f"the new source index (in {new.parent.parent})", exc) from None


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


def _inside_repo(data_dir: Path, repo_dir: Path) -> str:
    try:
        return data_dir.relative_to(repo_dir).as_posix()
    except ValueError:
        raise IngestError(
            f"{data_dir}: data.dir is outside the repository {repo_dir}; DVC can only version "
            f"a folder inside it (set data.dir in params.yaml)"
        ) from None


def _check_batch_location(batch_dir: Path, data_dir: Path) -> None:
    batch = batch_dir.resolve()
    if batch == data_dir or data_dir in batch.parents or batch in data_dir.parents:
        raise IngestError(
            f"{batch_dir}: the batch overlaps the data folder {data_dir}; put the batch "
            f"in a folder of its own outside {data_dir.name}/"
        )
