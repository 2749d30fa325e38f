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

This module judges the batch and writes the report. The duplicate check reads the sha256
of the files already in ``data/`` through ``tasks.data.data_hashes``; the accepted files
enter ``data/`` all at once or not at all through ``tasks.data.ingest_transaction``. Then
``dvc add`` and ``dvc push``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.data.data_hashes import DataHashes, existing_hashes, known_hashes, record_hashes
from tasks.data.dataset import UNTYPED, defect_type_of, is_candidate_file
from tasks.data.image_check import ALWAYS_BLOCKING, blocking_rules, inspect_image
from tasks.data.ingest_transaction import (
    AddedFile,
    IngestError,
    add_to_data,
    ingest_lock,
    open_no_follow,
    recover_interrupted,
    write_failure,
)
from tasks.data.snapshot import (
    SnapshotError,
    commit_command,
    commit_message,
    commit_snapshot,
    require_dvc_repo,
    snapshot_data,
)
from tasks.durable import write_json
from tasks.errors import FanaoiError
from tasks.params import Params, ValidateParams

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
DUPLICATE = "duplicate"  # the same bytes are already in the data set, same class
DUPLICATE_IN_BATCH = "duplicate_in_batch"
LABEL_CONFLICT = "label_conflict"  # the same bytes under the other class
UNREADABLE = "unreadable"  # empty, truncated, not an image, decompression bomb
INVALID = "invalid"  # decodes, but format, mode or size break a blocking validate limit
UNEXPECTED = "unexpected"  # not an image file, outside a class folder, a symlink
IGNORED = "ignored"  # hidden files such as .DS_Store
REJECTED = (LABEL_CONFLICT, UNREADABLE, INVALID, UNEXPECTED)


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
        added = added_files(accepted)
        if accepted:
            try:
                add_to_data(data_dir, added, _index_entries(accepted, batch_dir, started))
            except FanaoiError as exc:
                result["error"] = str(exc)
                write_report(result, path)
                raise
            report(f"added {len(accepted)} image(s) to {data_rel}/")
        record_hashes(hashes_dir, data_dir, params.data.classes, in_data, added)
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


def added_files(accepted: list[Verdict]) -> list[AddedFile]:
    """Each accepted file of the batch, and where it goes inside the data folder."""
    return [AddedFile(Path(v.path), Path(v.class_name, type_folder(v.defect_type), Path(v.stored_as).name),
                      v.sha256) for v in accepted]


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
        raise write_failure(path, "the ingest report", exc) from None


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
