"""The model registry: the champion, every promoted version and the log of every decision.

Layout of ``registry.dir`` (a local folder or a shared one on the line server)::

    champion.h5        the stable path consumers load; its model card is embedded in it
    champion.json      the champion's model card
    versions/<v>/      model.h5, card.json and history.csv of every promoted version
    log.jsonl          one line per decision: promote, reject, force, rollback
    .lock              held by the one process publishing

A version folder is written completely under a temporary name and renamed into place;
the champion files are replaced by temp file + fsync + ``os.replace``. ``champion.h5``
carries its own card (HDF5 attribute), so the model file decides which version is
champion: if a crash falls between replacing ``champion.h5`` and ``champion.json``,
:func:`read_champion` still returns the card of the model actually in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.durable import atomic_write, fsync_path, replace_path, sha256_of, write_json
from tasks.errors import FanaoiError
from tasks.model import ModelFileError, read_model_metadata
from tasks.params import Params, RegistryParams
from tasks.project_lock import held_lock
from tasks.snapshot import data_snapshot_id

log = logging.getLogger(__name__)

CARD_ATTR = "fanaoi_card"
MODEL_SHA256 = "model_sha256"  # in card.json: the sha256 of the version's model.h5
CHAMPION_MODEL = "champion.h5"
CHAMPION_CARD = "champion.json"
LOG_FILE = "log.jsonl"
HISTORY_FILE = "history.csv"  # in versions/<v>/: the training curves of that version
LOCK_FILE = ".lock"
STAGING_PREFIX = ".incoming-"
CHAMPION_ACTIONS = ("promote", "force", "rollback")
SMOKE_TOLERANCE = 1e-4
SMOKE_TIMEOUT_SECONDS = 600
SMOKE_MODULE = "tasks.predict"  # its main scores images in a fresh process (a module, not code text)
_VERSION = re.compile(r"^v?0*(\d+)$")


class RegistryError(FanaoiError):
    """The registry cannot do what was asked; the message names the path and the fix."""


class RegistryLockedError(RegistryError):
    """Another process holds the registry lock past the timeout: a later attempt may pass."""

    transient = True


class PublishError(RegistryError):
    """A candidate cannot be published; the champion is unchanged."""


@dataclass(frozen=True)
class Champion:
    """What the registry holds as champion. ``problem`` says why it is unusable, if it is."""

    card: dict[str, Any] | None
    model_path: Path
    problem: str | None

    @property
    def version(self) -> str | None:
        return self.card.get("version") if self.card else None


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- locking -------------------------------------------------------------------------


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


# --- atomic files ----------------------------------------------------------------------


def _copy_atomic(source: Path, target: Path) -> None:
    with source.open("rb") as origin:
        atomic_write(target, lambda handle: shutil.copyfileobj(origin, handle))


# --- reading -------------------------------------------------------------------------


def read_embedded_card(model_path: Path) -> dict[str, Any]:
    """The model card stored inside a published .h5 (h5py only, no TensorFlow)."""
    import h5py

    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    try:
        with h5py.File(model_path, "r") as handle:
            card = json.loads(handle.attrs[CARD_ATTR])
    except KeyError:
        raise ModelFileError(
            f"{model_path}: has no FanAOI model card, so it was not published by FanAOI"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{model_path}: not a readable .h5 file ({exc})") from None
    if not isinstance(card, dict) or "version" not in card:
        raise ModelFileError(f"{model_path}: its embedded model card is not a FanAOI card")
    return card


def _read_json(path: Path) -> dict[str, Any] | None:
    """A card file as a dict; None, with a warning, when it is missing, unreadable or not a card."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable model card (%s); using the card inside the model", path, exc)
        return None
    if not isinstance(card, dict):
        log.warning(
            "%s: holds a JSON %s, not a model card; using the card inside the model",
            path, type(card).__name__,
        )
        return None
    return card


def published_sha256(registry_dir: Path | str, version: str) -> str | None:
    """The sha256 of versions/<version>/model.h5 recorded when it was published.

    None for versions published before FanAOI recorded it: those load unverified.
    """
    card = _read_json(Path(registry_dir) / "versions" / version / "card.json")
    return card.get(MODEL_SHA256) if card else None


def integrity_problem(
    model_path: Path, registry_dir: Path | str, version: str, fix: str
) -> str | None:
    """None when ``model_path`` holds the bytes published as ``version``; else what is wrong."""
    expected = published_sha256(registry_dir, version)
    if expected is None:
        return None
    actual = sha256_of(model_path)
    if actual == expected:
        return None
    return (
        f"{model_path}: its sha256 {actual[:12]}... is not that of {version} as published "
        f"({expected[:12]}...): the file was changed or damaged; {fix}"
    )


def read_champion(registry_dir: Path | str) -> Champion | None:
    """The champion as it stands, or None when nothing was ever published.

    The card embedded in champion.h5 wins over champion.json, so the card returned always
    belongs to the model file in place; a model file that is missing or cannot be read
    is reported in ``problem`` with the card of champion.json, never raised.
    """
    registry_dir = Path(registry_dir)
    model_path, card_path = registry_dir / CHAMPION_MODEL, registry_dir / CHAMPION_CARD
    if not model_path.exists() and not card_path.exists():
        return None
    json_card = _read_json(card_path)
    try:
        card = read_embedded_card(model_path)
    except ModelFileError as exc:
        return Champion(json_card, model_path, f"{exc}; {_restore_hint(registry_dir)}")
    if json_card is not None and json_card.get("version") != card.get("version"):
        log.warning(
            "%s names %s but %s is %s (a publish was interrupted); %s is the champion",
            card_path, json_card.get("version"), model_path, card["version"], card["version"],
        )
    version = card["version"]
    problem = integrity_problem(
        model_path, registry_dir, version, f"restore it with `fanaoi rollback {version}`"
    )
    sealed = published_sha256(registry_dir, version)
    return Champion({**card, MODEL_SHA256: sealed} if sealed else card, model_path, problem)


def _restore_hint(registry_dir: Path) -> str:
    versions = list_versions(registry_dir)
    if versions:
        return f"restore it with `fanaoi rollback VERSION` (versions: {', '.join(versions)})"
    return "publish a model with `fanaoi gate` or `fanaoi promote --force`"


def champion_card(registry_dir: Path | str) -> dict[str, Any]:
    """The card of a usable champion; RegistryError says why there is none."""
    champion = read_champion(registry_dir)
    if champion is None:
        raise RegistryError(
            f"{registry_dir}: no champion yet; train a candidate and run `fanaoi gate`"
        )
    if champion.problem:
        raise RegistryError(champion.problem)
    return champion.card or {}


def list_versions(registry_dir: Path | str) -> list[str]:
    """Published versions, oldest first."""
    folder = Path(registry_dir) / "versions"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(names, key=_version_number)


def _version_number(name: str) -> int:
    match = _VERSION.match(name)
    if not match:
        raise RegistryError(f"{name!r} is not a version; versions look like v0003 (or 3)")
    return int(match.group(1))


def version_name(text: str) -> str:
    """'3', 'v3' and 'v0003' all name version v0003."""
    return f"v{_version_number(text.strip()):04d}"


def published_version(
    registry_dir: Path | str,
    version: str | None,
    *,
    error: type[FanaoiError] = RegistryError,
    hint: str = "",
) -> tuple[str, Path]:
    """Name and folder of a published version (``None``: the champion's); ``error`` if none.

    ``hint`` ends the message with what the command can do instead.
    """
    registry_dir = Path(registry_dir)
    name = version_name(version) if version else champion_card(registry_dir)["version"]
    folder = registry_dir / "versions" / name
    if not (folder / "model.h5").is_file() or not (folder / "card.json").is_file():
        raise error(
            f"{folder}: no such published version; versions: "
            f"{', '.join(list_versions(registry_dir)) or 'none'}" + (f" {hint}" if hint else "")
        )
    return name, folder


def read_log(registry_dir: Path | str) -> list[dict[str, Any]]:
    """Every decision, oldest first. A line cut short by a crash is skipped with a warning."""
    path = Path(registry_dir) / LOG_FILE
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.warning("%s:%d: unreadable log line skipped", path, number)
    return entries


def reject_streak(entries: Sequence[dict[str, Any]]) -> int:
    """Gate rejections since the last decision that was not one (a promotion, a rollback)."""
    count = 0
    for entry in reversed(entries):
        if entry.get("action") != "reject":
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


# --- writing -------------------------------------------------------------------------


def _append_log(registry_dir: Path, entry: dict[str, Any]) -> None:
    """Append one decision; the caller holds the registry lock."""
    with (registry_dir / LOG_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": utc_now(), **entry}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def record_decision(registry: RegistryParams, entry: dict[str, Any]) -> None:
    """Append a decision that publishes nothing (a gate rejection) to log.jsonl."""
    registry_dir = Path(registry.dir)
    with registry_lock(registry_dir, registry.lock_timeout):
        _remove_leftovers(registry_dir)
        _append_log(registry_dir, entry)


def _remove_leftovers(registry_dir: Path) -> None:
    """Temp files and staged folders of a publish or card update that was killed.

    Every command that changes the registry calls it first (it holds the lock).
    """
    for temp in registry_dir.glob(".*.tmp"):
        temp.unlink()
    for scratch in registry_dir.glob(".card-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    for staged in (registry_dir / "versions").glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staged)


def _next_version(registry_dir: Path) -> str:
    versions = list_versions(registry_dir)
    return f"v{(_version_number(versions[-1]) if versions else 0) + 1:04d}"


def _install_champion(registry_dir: Path, version: str) -> None:
    """Make a published version the champion: model file first, then its card."""
    folder = registry_dir / "versions" / version
    _copy_atomic(folder / "model.h5", registry_dir / CHAMPION_MODEL)
    _copy_atomic(folder / "card.json", registry_dir / CHAMPION_CARD)


def git_revision(repo_dir: Path | str) -> str | None:
    """HEAD of the repository at ``repo_dir``, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def build_card(
    version: str,
    candidate_path: Path,
    gate_result: dict[str, Any],
    params: Params,
    *,
    repo_dir: Path | str,
    action: str,
    reason: str | None,
) -> dict[str, Any]:
    """Everything a consumer and an auditor need to know about a published model."""
    metadata = read_model_metadata(candidate_path)
    mapping = metadata["class_mapping"]
    return {
        "version": version,
        "time": utc_now(),
        "action": action,
        "reason": reason,
        "source": {"path": str(candidate_path), "sha256": sha256_of(candidate_path)},
        "data_snapshot": data_snapshot_id(repo_dir, params.data.dir),
        "git_revision": git_revision(repo_dir),
        "class_mapping": mapping,
        "positive_class": next(name for name, label in mapping.items() if label == 1),
        "input_size": metadata["preprocessing"]["input_size"],
        "preprocessing": metadata["preprocessing"],
        # initial weights (random or a champion version), first-layer init, pruning
        "training": metadata["training"],
        "threshold": gate_result["threshold"],
        "threshold_source": gate_result.get("threshold_source"),
        "review_band": gate_result.get("review_band"),
        "metrics": {"validation": gate_result["candidate"]["metrics"]},
        "gate": {
            "decision": gate_result["decision"],
            "reasons": gate_result["reasons"],
            "champion_version": gate_result["champion"].get("version"),
        },
        "params": params.to_dict(),
    }


def _embed_card(model_path: Path, card: dict[str, Any]) -> None:
    import h5py

    with h5py.File(model_path, "a") as handle:
        handle.attrs[CARD_ATTR] = json.dumps(card)


def _seal(model_path: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Embed ``card`` in the model file; return card.json's card: it plus the file's sha256.

    The model file cannot hold its own hash, so card.json of the version records it and
    every load of that version (or of the champion copied from it) checks it.
    """
    embedded = {key: value for key, value in card.items() if key != MODEL_SHA256}
    _embed_card(model_path, embedded)
    return {**embedded, MODEL_SHA256: sha256_of(model_path)}


def update_card(registry_dir: Path | str, version: str, card: dict[str, Any]) -> None:
    """Replace a published version's card: in its model file first, then card.json.

    The caller holds the registry lock. When the version is the champion it is installed
    again, so champion.h5 and champion.json carry the new card too.
    """
    registry_dir = Path(registry_dir)
    folder = registry_dir / "versions" / version
    # Asked before the edit: afterwards champion.h5 no longer matches the version's sha256.
    champion = read_champion(registry_dir)
    is_champion = champion is not None and champion.problem is None and champion.version == version
    with tempfile.TemporaryDirectory(dir=registry_dir, prefix=".card-") as scratch:
        edited = Path(scratch) / "model.h5"
        shutil.copyfile(folder / "model.h5", edited)
        sealed = _seal(edited, card)
        _copy_atomic(edited, folder / "model.h5")
    write_json(folder / "card.json", sealed)
    if is_champion:
        _install_champion(registry_dir, version)


def _stage_version(
    registry_dir: Path, version: str, candidate_path: Path, card: dict, history: Path
) -> Path:
    """versions/.incoming-<v>/ with model.h5 (card embedded), card.json and the training
    curves (history.csv, when the candidate's run left one), all fsynced."""
    staged = registry_dir / "versions" / f"{STAGING_PREFIX}{version}"
    staged.mkdir(parents=True)
    if history.is_file():
        shutil.copyfile(history, staged / HISTORY_FILE)
        fsync_path(staged / HISTORY_FILE)
    shutil.copyfile(candidate_path, staged / "model.h5")
    card = _seal(staged / "model.h5", card)
    fsync_path(staged / "model.h5")
    write_json(staged / "card.json", card)
    return staged


def smoke_test(model_path: Path, references: Sequence[dict[str, Any]]) -> None:
    """Load ``model_path`` in a fresh Python process; it must reproduce the gate's numbers.

    ``references`` are {"path", "probability"} pairs scored during the gate. A file that
    cannot be loaded, or predicts differently, raises PublishError.
    """
    project_root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")])),
    }
    paths = [str(reference["path"]) for reference in references]
    try:
        result = subprocess.run(
            [sys.executable, "-m", SMOKE_MODULE, str(os.getpid()), str(model_path), *paths],
            capture_output=True, text=True, env=env, timeout=SMOKE_TIMEOUT_SECONDS, check=False,
        )
    except subprocess.TimeoutExpired:
        raise PublishError(
            f"{model_path}: smoke test timed out after {SMOKE_TIMEOUT_SECONDS} s; not published"
        ) from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PublishError(f"{model_path}: a fresh process cannot load it ({why}); not published")
    _compare_smoke(model_path, references, json.loads(lines[-1]))


def _compare_smoke(
    model_path: Path, references: Sequence[dict[str, Any]], probabilities: Sequence[float]
) -> None:
    for reference, probability in zip(references, probabilities, strict=True):
        if not abs(probability - reference["probability"]) <= SMOKE_TOLERANCE:  # NaN fails too
            raise PublishError(
                f"{model_path}: in a fresh process it predicts {probability:.6f} for "
                f"{reference['path']} where the gate measured {reference['probability']:.6f}; "
                f"not published (retrain, and check the .h5 loads with tasks.model.load_model)"
            )


def publish(
    candidate_path: Path | str,
    gate_result: dict[str, Any],
    params: Params,
    repo_dir: Path | str = ".",
    *,
    force_reason: str | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Publish a candidate the gate promoted (or an operator forced) as the new champion.

    Returns its model card. The version folder is complete and smoke-tested before the
    champion files change; on any failure the old champion stays in place.
    """
    candidate_path, registry_dir = Path(candidate_path), Path(params.registry.dir)
    if gate_result["decision"] != "promote" and force_reason is None:
        raise PublishError(
            f"{candidate_path}: the gate rejected it ({'; '.join(gate_result['failed'])}); "
            f"to publish anyway run `fanaoi promote --force --reason TEXT`"
        )
    action = "promote" if force_reason is None else "force"
    with registry_lock(registry_dir, params.registry.lock_timeout):
        _remove_leftovers(registry_dir)
        previous = read_champion(registry_dir)
        previous_version = previous.version if previous else None
        version = _next_version(registry_dir)
        card = build_card(
            version, candidate_path, gate_result, params,
            repo_dir=repo_dir, action=action, reason=force_reason,
        )
        history = Path(gate_result["candidate"]["history"])
        staged = _stage_version(registry_dir, version, candidate_path, card, history)
        card = json.loads((staged / "card.json").read_text(encoding="utf-8"))  # with model_sha256
        try:
            smoke_test(staged / "model.h5", gate_result["smoke"])
        except PublishError as exc:
            shutil.rmtree(staged)
            entry = decision_entry("reject", gate_result, None, previous_version, [str(exc)])
            _append_log(registry_dir, entry)
            raise
        replace_path(staged, registry_dir / "versions" / version)
        _install_champion(registry_dir, version)
        reasons = gate_result["reasons"]
        if force_reason:
            reasons = [*reasons, f"forced by operator: {force_reason}"]
        entry = decision_entry(action, gate_result, version, previous_version, reasons)
        _append_log(registry_dir, entry)
    report(f"published {version} as champion: {registry_dir / CHAMPION_MODEL}")
    return card


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
        "metric": gate_result["metric"],
        "value": metrics[gate_result["metric"]],
        "escape_rate": metrics["escape_rate"],
        "overkill_rate": metrics["overkill_rate"],
        "reasons": reasons,
        "failed": gate_result["failed"],
    }


def rollback(registry: RegistryParams, version: str, reason: str | None = None) -> dict[str, Any]:
    """Make an earlier published version the champion again (atomic, logged). Returns its card."""
    registry_dir = Path(registry.dir)
    with registry_lock(registry_dir, registry.lock_timeout):
        _remove_leftovers(registry_dir)
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
        _install_champion(registry_dir, version)
        _append_log(registry_dir, {
            "action": "rollback",
            "version": version,
            "previous": previous.version if previous else None,
            "reasons": [reason or f"rollback to {version}"],
        })
    return card
