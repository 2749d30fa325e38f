"""The model registry's folder: its layout, its lock and the moves that keep it whole.

Layout of ``registry.dir`` (a local folder or a shared one on the line server)::

    champion.h5        the stable path consumers load; its model card is embedded in it
    champion.json      the champion's model card
    versions/<v>/      model.h5, card.json and history.csv of every promoted version
                       (and .log-entry.json until its publish is finished)
    log.jsonl          one line per decision: promote, reject, force, rollback
    .lock              held by the one process publishing

A version folder is written completely under a temporary name and renamed into place
with its log line inside it (``.log-entry.json``); installing it as champion and moving
that line to ``log.jsonl`` finish the publish, and the next command that changes the
registry finishes a publish killed in between (``recover_leftovers``), so a version
folder never stays without its line. The champion files are replaced by temp file +
fsync + ``os.replace``. ``champion.h5``
carries its own card (HDF5 attribute), so the model file decides which version is
champion: if a crash falls between replacing ``champion.h5`` and ``champion.json``,
``champion.read_champion`` still returns the card of the model actually in place. The other
modules of the registry: ``champion`` (reading), ``publish`` (writing a version),
``decisions`` (log.jsonl and rollback).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.durable import atomic_write
from tasks.errors import FanaoiError
from tasks.project_lock import held_lock

CARD_ATTR = "fanaoi_card"
MODEL_SHA256 = "model_sha256"  # in card.json: the sha256 of the version's model.h5
CHAMPION_MODEL = "champion.h5"
CHAMPION_CARD = "champion.json"
LOG_FILE = "log.jsonl"
HISTORY_FILE = "history.csv"  # in versions/<v>/: the training curves of that version
LOCK_FILE = ".lock"
STAGING_PREFIX = ".incoming-"
PENDING_ENTRY = ".log-entry.json"  # in versions/<v>/: its log.jsonl line until the publish is finished
_VERSION = re.compile(r"^v?0*(\d+)$")


class RegistryError(FanaoiError):
    """The registry cannot do what was asked; the message names the path and the fix."""


class RegistryLockedError(RegistryError):
    """Another process holds the registry lock past the timeout: a later attempt may pass."""

    transient = True


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def registry_lock(registry_dir: Path | str, timeout: float = 60.0) -> Iterator[None]:
    """Hold the registry's lock file: one publisher at a time, across processes.

    The OS releases the lock when its holder dies, so a killed run never blocks the next.
    """
    registry_dir = Path(registry_dir)
    with held_lock(registry_dir / LOCK_FILE, "registry update", timeout, lambda holder: RegistryLockedError(
        f"another FanAOI run ({holder}) is publishing to {registry_dir}; wait for it to finish, "
        f"stop it, or raise registry.lock_timeout (now {timeout:g} s) in params.yaml"
    )):
        yield


def copy_atomic(source: Path, target: Path) -> None:
    with source.open("rb") as origin:
        atomic_write(target, lambda handle: shutil.copyfileobj(origin, handle))


def install_champion(registry_dir: Path, version: str) -> None:
    """Make a published version the champion: model file first, then its card."""
    folder = registry_dir / "versions" / version
    copy_atomic(folder / "model.h5", registry_dir / CHAMPION_MODEL)
    copy_atomic(folder / "card.json", registry_dir / CHAMPION_CARD)


def append_log(registry_dir: Path, entry: dict[str, Any]) -> None:
    """Append one decision to log.jsonl; the caller holds the registry lock."""
    with (registry_dir / LOG_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": utc_now(), **entry}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def finish_publish(registry_dir: Path, version: str) -> None:
    """Install a renamed version folder as champion and move its pending line to log.jsonl.

    Safe to repeat: a kill anywhere in here leaves the pending line, and the next
    ``recover_leftovers`` runs it again.
    """
    pending = registry_dir / "versions" / version / PENDING_ENTRY
    try:
        entry = json.loads(pending.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(
            f"{pending}: the log line of a publish that was cut short is unreadable ({exc}); "
            f"delete {pending.parent} to drop that version, then rerun"
        ) from None
    install_champion(registry_dir, version)
    append_log(registry_dir, entry)
    pending.unlink()


def recover_leftovers(registry_dir: Path) -> None:
    """Finish a publish killed after its version folder was in place; remove what other killed
    publishes and card updates left (temp files, staged folders).

    Every command that changes the registry calls it first (it holds the lock).
    """
    for temp in registry_dir.glob(".*.tmp"):
        temp.unlink()
    for scratch in registry_dir.glob(".card-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    for staged in (registry_dir / "versions").glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staged)
    for version in list_versions(registry_dir):
        if (registry_dir / "versions" / version / PENDING_ENTRY).exists():
            finish_publish(registry_dir, version)


def list_versions(registry_dir: Path | str) -> list[str]:
    """Published versions, oldest first."""
    folder = Path(registry_dir) / "versions"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(names, key=version_number)


def version_number(name: str) -> int:
    match = _VERSION.match(name)
    if not match:
        raise RegistryError(f"{name!r} is not a version; versions look like v0003 (or 3)")
    return int(match.group(1))


def version_name(text: str) -> str:
    """'3', 'v3' and 'v0003' all name version v0003."""
    return f"v{version_number(text.strip()):04d}"
