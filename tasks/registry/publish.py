"""Publishing a candidate as a new version and champion, all or nothing, and editing a published card.

A version folder is written completely under a temporary name, smoke-tested in a fresh
process and renamed into place before the champion files change.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.child_process import child_command, child_env
from tasks.data.snapshot import data_snapshot_id
from tasks.durable import fsync_path, replace_path, sha256_of, write_json
from tasks.errors import printable
from tasks.inference.model_file import read_model_metadata
from tasks.params import Params
from tasks.registry.champion import read_champion
from tasks.registry.decisions import decision_entry
from tasks.registry.store import (
    CARD_ATTR,
    CHAMPION_MODEL,
    HISTORY_FILE,
    MODEL_SHA256,
    PENDING_ENTRY,
    STAGING_PREFIX,
    RegistryError,
    append_log,
    copy_atomic,
    finish_publish,
    install_champion,
    list_versions,
    recover_leftovers,
    registry_lock,
    utc_now,
    version_number,
)

log = logging.getLogger(__name__)

SMOKE_TOLERANCE = 1e-4
SMOKE_TIMEOUT_SECONDS = 600
SMOKE_MODULE = "tasks.inference.predictor"  # its main scores images in a fresh process (a module, not code text)


class PublishError(RegistryError):
    """A candidate cannot be published; the champion is unchanged."""


def _next_version(registry_dir: Path) -> str:
    versions = list_versions(registry_dir)
    return f"v{(version_number(versions[-1]) if versions else 0) + 1:04d}"


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
        copy_atomic(edited, folder / "model.h5")
    write_json(folder / "card.json", sealed)
    if is_champion:
        install_champion(registry_dir, version)


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
    paths = [str(reference["path"]) for reference in references]
    try:
        result = subprocess.run(
            child_command(SMOKE_MODULE, str(model_path), *paths),
            capture_output=True, text=True, env=child_env(TF_CPP_MIN_LOG_LEVEL="2"),
            timeout=SMOKE_TIMEOUT_SECONDS, check=False,
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
                f"not published (retrain, and check the .h5 loads with tasks.model.network.load_model)"
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
    if force_reason is not None:  # typed by an operator; the card and the log are printed line by line
        force_reason = printable(force_reason)
    with registry_lock(registry_dir, params.registry.lock_timeout):
        recover_leftovers(registry_dir)
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
            append_log(registry_dir, entry)
            raise
        reasons = gate_result["reasons"]
        if force_reason:
            reasons = [*reasons, f"forced by operator: {force_reason}"]
        # The log line moves in with the folder: a kill from here on is finished by the next command.
        write_json(staged / PENDING_ENTRY, decision_entry(action, gate_result, version, previous_version, reasons))
        replace_path(staged, registry_dir / "versions" / version)
        finish_publish(registry_dir, version)
    report(f"published {version} as champion: {registry_dir / CHAMPION_MODEL}")
    return card
