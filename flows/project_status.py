"""The project's state on one screen: the champion, the data snapshot, and whether they agree.

Read from files only (the registry, ``data.dvc``, ``dvc.lock``, the DVC cache's listing of
a snapshot, ``data/.sources.jsonl``, the snapshot's stamp), without importing DVC or
TensorFlow and without walking data/, so that ``fanaoi status`` answers in well under two
seconds whatever the number of images. A damaged file is reported under
``problems`` (its name and the fix) and the rest of the screen is still shown.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Required, TypeVar

import yaml
from pydantic import Field, with_config
from typing_extensions import TypedDict

from tasks.data.ingest_transaction import INDEX_NAME
from tasks.data.snapshot import changed_folders, pointer_file
from tasks.registry.champion import read_champion
from tasks.registry.decisions import read_log
from tasks.shapes import STRICT, BadFile, IsoTime, checked

CARD_METRICS = ("accuracy", "escape_rate", "escape_rate_upper95", "overkill_rate")
# The keys of the status's ``problems`` (under "data"): the damaged files, each with its message.
POINTER, LOCK, INDEX, LOG = "data.dvc", "dvc.lock", "sources", "log"

T = TypeVar("T")


@with_config(STRICT)
class PointerOut(TypedDict, total=False):
    md5: Required[str]
    nfiles: int
    size: int


@with_config(STRICT)
class Pointer(TypedDict):
    """data.dvc as ``dvc add`` writes it: one out, the data folder."""

    outs: Annotated[list[PointerOut], Field(min_length=1)]


@with_config(STRICT)
class LockDep(TypedDict, total=False):
    path: Required[str]
    md5: str


@with_config(STRICT)
class LockStage(TypedDict, total=False):
    deps: list[LockDep]


@with_config(STRICT)
class DvcLock(TypedDict, total=False):
    stages: dict[str, LockStage]


@with_config(STRICT)
class Source(TypedDict, total=False):
    """One line of the ingest index: where an ingested image came from, and when."""

    file: Required[str]
    batch: str
    ingested_at: IsoTime


def project_status(
    project: Path, data_dir: str, registry_dir: Path, now: datetime, stamp_dir: str,
) -> dict[str, Any]:
    """Champion, data, the agreement between registry, data and dvc.lock, and the last rejection.

    ``stamp_dir`` holds the stamp of the last snapshot (validate.cache_dir).
    """
    champion = champion_status(registry_dir, now)
    data = data_status(project, data_dir, stamp_dir)
    log_entries = noted(data["problems"], LOG, lambda: read_log(registry_dir), [])
    return {
        "champion": champion,
        "data": data,
        "agreement": agreement(champion, data, log_entries),
        "last_reject": next((entry for entry in reversed(log_entries) if entry["action"] == "reject"), None),
    }


def noted(problems: dict[str, str], key: str, read: Callable[[], T], instead: T) -> T:
    """What ``read`` returns; ``instead`` when the file is damaged, its message kept under ``key``."""
    try:
        return read()
    except BadFile as exc:
        problems[key] = str(exc)
        return instead


def champion_status(registry_dir: Path, now: datetime) -> dict[str, Any] | None:
    """Version, age, validation metrics and threshold of the champion; None before the first."""
    champion = read_champion(registry_dir)
    if champion is None:
        return None
    card = champion.card or {}
    published = card.get("time")
    validation = card.get("metrics", {}).get("validation", {})
    return {
        "version": champion.version,
        "path": str(champion.model_path),
        "published": published,
        "age_seconds": _age(published, now),
        "action": card.get("action"),
        "threshold": card.get("threshold"),
        "metrics": {name: validation[name] for name in CARD_METRICS if name in validation},
        "validation_images": validation.get("count"),
        "data_snapshot": card.get("data_snapshot"),
        "problem": champion.problem,
    }


def _age(published: str | None, now: datetime) -> float | None:
    try:
        return (now - datetime.fromisoformat(published)).total_seconds() if published else None
    except ValueError:
        return None


def data_status(project: Path, data_dir: str, stamp_dir: str) -> dict[str, Any]:
    """The snapshot data.dvc points at, what data/ holds, what the last training used.

    Whether data/ still holds the snapshot comes from the snapshot's stamp (a stat per
    folder); only a snapshot FanAOI did not make (a plain ``dvc add``) costs a walk of data/.
    """
    problems: dict[str, str] = {}
    pointer = noted(problems, POINTER, lambda: _pointer(project, data_dir), {})
    trained = noted(problems, LOCK, lambda: trained_snapshot(project, data_dir), None)
    pending = noted(problems, INDEX, lambda: pending_batches(project, data_dir, trained), None)
    folder = project / data_dir
    changed = changed_folders(project, data_dir, stamp_dir, pointer["md5"]) if pointer and folder.is_dir() else None
    if changed == []:
        on_disk = (pointer.get("nfiles"), pointer.get("size"))
    else:
        on_disk = None if changed else _folder_totals(folder)
    return {
        "snapshot": pointer.get("md5"),
        "snapshot_files": pointer.get("nfiles"),
        "snapshot_bytes": pointer.get("size"),
        "folder_files": on_disk[0] if on_disk else None,
        "folder_bytes": on_disk[1] if on_disk else None,
        "changed_folders": changed or [],
        "trained_snapshot": trained,
        "pending_batches": pending,
        "problems": problems,
    }


def _pointer(project: Path, data_dir: str) -> dict[str, Any]:
    """The out of data.dvc ({} before the first snapshot)."""
    path = pointer_file(project, data_dir)
    fix = f"restore it with `git checkout -- {path.name}` or recreate it with `dvc add {data_dir}`"
    pointer = _yaml_file(path, fix)
    return checked(Pointer, pointer, str(path), fix)["outs"][0] if pointer is not None else {}


def trained_snapshot(project: Path, data_dir: str) -> str | None:
    """The md5 of ``data_dir`` that dvc.lock recorded for the train stage."""
    path = project / "dvc.lock"
    fix = "restore it with `git checkout -- dvc.lock`; the next nightly run rewrites it"
    lock = _yaml_file(path, fix)
    if lock is None:
        return None
    deps = checked(DvcLock, lock, str(path), fix).get("stages", {}).get("train", {}).get("deps", [])
    return next((dep.get("md5") for dep in deps if dep["path"] == data_dir), None)


def _yaml_file(path: Path, fix: str) -> Any:
    """The YAML document at ``path``; None when there is no such file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError) as exc:
        raise BadFile(f"{path}: unreadable ({type(exc).__name__}); {fix}") from None


def _folder_totals(folder: Path) -> tuple[int, int] | None:
    """Files and bytes under ``folder`` as ``dvc add`` counts them (stat only, no hashing)."""
    if not folder.is_dir():
        return None
    files = size = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            status = os.lstat(os.path.join(root, name))
            files, size = files + 1, size + status.st_size
    return files, size


def snapshot_listing(project: Path, md5: str) -> set[str] | None:
    """Relative paths of the files of a snapshot, from the local DVC cache's ``.dir`` entry."""
    digest = md5.removesuffix(".dir")
    path = project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir"
    try:
        return {entry["relpath"] for entry in json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pending_batches(project: Path, data_dir: str, trained: str | None) -> list[dict[str, Any]] | None:
    """Ingested batches with images the last training did not see, oldest first.

    None when it cannot be told: the trained snapshot's listing is not in the DVC cache
    (``dvc fetch`` brings it).
    """
    index = project / data_dir / INDEX_NAME
    seen: set[str] = set()
    if trained is not None:
        listing = snapshot_listing(project, trained)
        if listing is None:
            return None
        seen = listing
    batches: dict[str, dict[str, Any]] = defaultdict(lambda: {"images": 0})
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    prefix = f"{data_dir}/"
    for number, line in enumerate(lines, start=1):
        # Ingest writes the index whole into the new data tree: a bad line is damage, not a cut.
        where, fix = f"{index}:{number}", "repair or delete that line"
        try:
            entry = json.loads(line)
        except ValueError:
            raise BadFile(f"{where}: not JSON; {fix}") from None
        checked(Source, entry, where, fix)
        relative = entry["file"].removeprefix(prefix)
        if relative in seen:
            continue
        batch = batches[entry.get("batch", "?")]
        batch["images"] += 1
        batch["ingested_at"] = entry.get("ingested_at")
    return sorted(
        ({"batch": name, **info} for name, info in batches.items()),
        key=lambda row: row.get("ingested_at") or "",
    )


def agreement(
    champion: dict[str, Any] | None, data: dict[str, Any], log_entries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Three checks, each with ``ok`` and what it means for the operator."""
    return [_folder_vs_pointer(data), _pointer_vs_lock(data), _registry_vs_lock(champion, data, log_entries)]


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


def _unknown(name: str, data: dict[str, Any], *files: str) -> dict[str, Any] | None:
    """A failed check when one of the ``files`` it compares is damaged (None when all are fine)."""
    damaged = [file for file in files if file in data["problems"]]
    return _check(name, False, f"unknown: {' and '.join(damaged)} damaged (see above)") if damaged else None


def _folder_vs_pointer(data: dict[str, Any]) -> dict[str, Any]:
    name = "data/ = data.dvc"
    if unknown := _unknown(name, data, POINTER):
        return unknown
    if data["snapshot"] is None:
        return _check(name, False, "no data snapshot yet: run `fanaoi snapshot` (or the nightly flow)")
    if data["changed_folders"]:
        return _check(name, False, f"files were added, removed or renamed in "
                                   f"{', '.join(data['changed_folders'])} since data.dvc was written: {_BY_HAND}")
    if data["folder_files"] is None:
        return _check(name, False, "the data folder is missing: `dvc checkout data.dvc` restores it")
    recorded = (data["snapshot_files"], data["snapshot_bytes"])
    found = (data["folder_files"], data["folder_bytes"])
    if recorded == found:
        return _check(name, True, f"{found[0]:,} files, {found[1]:,} bytes")
    return _check(name, False, f"data/ holds {found[0]:,} files ({found[1]:,} bytes), data.dvc records "
                               f"{recorded[0] or 0:,} ({recorded[1] or 0:,} bytes): {_BY_HAND}")


# Files put into data/ by hand passed no check (ingest checks each one): never snapshot them unread.
_BY_HAND = ("`fanaoi validate` checks them, then `fanaoi snapshot` records them (or `dvc checkout data.dvc` "
            "puts data/ back as recorded)")


def _pointer_vs_lock(data: dict[str, Any]) -> dict[str, Any]:
    name = "data.dvc = dvc.lock"
    if unknown := _unknown(name, data, POINTER, LOCK):
        return unknown
    if data["trained_snapshot"] is None:
        return _check(name, False, "no training recorded in dvc.lock yet: the next run trains")
    if data["trained_snapshot"] == data["snapshot"]:
        return _check(name, True, "the last training used the current snapshot")
    return _check(name, False, (
        f"the last training used snapshot {_short(data['trained_snapshot'])}, data.dvc is "
        f"{_short(data['snapshot'])}: the next nightly run trains on the new data"
    ))


def _registry_vs_lock(
    champion: dict[str, Any] | None, data: dict[str, Any], log_entries: list[dict[str, Any]]
) -> dict[str, Any]:
    name = "registry = dvc.lock"
    if champion is None:
        return _check(name, False, "no champion yet: the next promoted candidate becomes v0001")
    if champion["problem"]:
        return _check(name, False, champion["problem"])
    ours, trained = champion["data_snapshot"], data["trained_snapshot"]
    if ours == trained and LOCK not in data["problems"]:
        return _check(name, True, f"{champion['version']} was trained on the snapshot dvc.lock records")
    if unknown := _unknown(name, data, LOCK, LOG):
        return unknown
    last = log_entries[-1] if log_entries else {}
    if last.get("action") in ("reject", "rollback", "force"):
        # A champion from older data is the expected outcome of these decisions.
        return _check(name, True, (
            f"{champion['version']} is from snapshot {_short(ours)}; the last decision "
            f"was {last['action']}"
        ))
    return _check(name, False, (
        f"{champion['version']} was trained on snapshot {_short(ours)} but dvc.lock records "
        f"{_short(trained)} and no rejection: another copy of the project publishes to this "
        f"registry, or dvc.lock comes from another revision"
    ))


def _short(md5: str | None) -> str:
    return md5[:8] if md5 else "none"


def now_utc() -> datetime:
    return datetime.now(UTC)
