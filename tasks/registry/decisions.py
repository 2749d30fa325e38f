"""log.jsonl, every decision the registry took (promote, reject, force, rollback), and rollback itself."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Required

from pydantic import with_config
from typing_extensions import TypedDict

from tasks.errors import printable
from tasks.params import RegistryParams
from tasks.registry.champion import integrity_problem, published_version, read_champion, read_embedded_card
from tasks.registry.store import (
    LOG_FILE,
    PENDING_ENTRY,
    RegistryError,
    append_log,
    install_champion,
    list_versions,
    recover_leftovers,
    registry_lock,
)
from tasks.shapes import STRICT, IsoTime, checked

log = logging.getLogger(__name__)

CHAMPION_ACTIONS = ("promote", "force", "rollback")


@with_config(STRICT)
class LogEntry(TypedDict, total=False):
    """One line of log.jsonl, as far as history, rollback and the gate's streak read it."""

    time: Required[IsoTime]
    action: Required[Literal["promote", "reject", "force", "rollback"]]
    version: str | None
    previous: str | None
    metric: str
    value: float | None  # a metric undefined on the images (AUC with one class) is null
    escape_rate: float
    overkill_rate: float
    reasons: list[str]
    failed: list[str]
    saturated: bool
    tie: bool


def read_log(registry_dir: Path | str) -> list[dict[str, Any]]:
    """Every decision, oldest first. A line cut short by a crash is skipped with a warning.

    A whole line of another shape was edited or damaged, not cut: BadFile names it.
    """
    path = Path(registry_dir) / LOG_FILE
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("%s:%d: unreadable log line skipped", path, number)
            continue
        entries.append(checked(LogEntry, entry, f"{path}:{number}", "repair or delete that line"))
    return entries


def unlogged_versions(registry_dir: Path | str, entries: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Version folders that no log line published, each with whether its publish is pending
    (killed before its line was logged: the next command that changes the registry finishes it).

    The others were published by a FanAOI older than pending lines, or their line was removed.
    """
    logged = {entry.get("version") for entry in entries if entry["action"] in ("promote", "force")}
    folder = Path(registry_dir) / "versions"
    return {
        version: (folder / version / PENDING_ENTRY).exists()
        for version in list_versions(registry_dir) if version not in logged
    }


def reject_streak(entries: Sequence[dict[str, Any]]) -> int:
    """Rejections of a worse candidate since the last night that was not one.

    A rejection marked ``tie`` (the candidate held the champion's saturated primary metric and every
    guard, and lost only on log loss) ends the streak as a promotion or a rollback does: retraining
    made a model as good as a perfect champion, so nothing is wrong with the nightly run, and the
    streak counts failed nights in a row. Entries written before ties were recorded count as worse.
    """
    count = 0
    for entry in reversed(entries):
        if entry.get("action") != "reject" or entry.get("tie"):
            break
        count += 1
    return count


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; without a zone it is local time."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RegistryError(
            f"{text!r} is not a time; use ISO 8601, e.g. 2026-11-25T07:00 or 2026-11-25T07:00Z"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


def champion_at(registry_dir: Path | str, moment: datetime) -> dict[str, Any] | None:
    """The log entry that made the champion current at ``moment`` (None: no champion yet)."""
    current = None
    for entry in read_log(registry_dir):
        if entry.get("action") in CHAMPION_ACTIONS and parse_time(entry["time"]) <= moment:
            current = entry
    return current


def record_decision(registry: RegistryParams, entry: dict[str, Any]) -> None:
    """Append a decision that publishes nothing (a gate rejection) to log.jsonl."""
    registry_dir = Path(registry.dir)
    with registry_lock(registry_dir, registry.lock_timeout):
        recover_leftovers(registry_dir)
        append_log(registry_dir, entry)


def decision_entry(
    action: str, gate_result: dict, version: str | None, previous: str | None, reasons: list[str]
) -> dict[str, Any]:
    """The log.jsonl line of a gate decision: what was decided about which candidate, and why."""
    metrics = gate_result["candidate"]["metrics"]
    return {
        "action": action,
        "version": version,
        "previous": previous,
        "candidate": gate_result["candidate"]["path"],
        "metric": gate_result["deciding_metric"],  # `fanaoi history` shows log_loss when it decided
        "value": metrics[gate_result["deciding_metric"]],
        "escape_rate": metrics["escape_rate"],
        "overkill_rate": metrics["overkill_rate"],
        "reasons": reasons,
        "failed": gate_result["failed"],
        "saturated": gate_result["saturated"],
        "tie": action == "reject" and gate_result["tie"],  # ends the reject streak
    }


def rollback(registry: RegistryParams, version: str, reason: str | None = None) -> dict[str, Any]:
    """Make an earlier published version the champion again (atomic, logged). Returns its card."""
    registry_dir = Path(registry.dir)
    with registry_lock(registry_dir, registry.lock_timeout):
        recover_leftovers(registry_dir)
        version, folder = published_version(registry_dir, version)
        card = read_embedded_card(folder / "model.h5")
        others = [v for v in list_versions(registry_dir) if v != version]
        problem = integrity_problem(
            folder / "model.h5", registry_dir, version,
            f"roll back to another version ({', '.join(others) or 'none'})",
        )
        if problem:
            raise RegistryError(problem)
        previous = read_champion(registry_dir)
        install_champion(registry_dir, version)
        append_log(registry_dir, {
            "action": "rollback",
            "version": version,
            "previous": previous.version if previous else None,
            # typed by an operator; `fanaoi history` prints one line per entry
            "reasons": [printable(reason) if reason else f"rollback to {version}"],
        })
    return card
