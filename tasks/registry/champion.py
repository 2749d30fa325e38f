"""The champion and the published versions as they stand, checked against their recorded sha256.

Reading only: h5py for the card embedded in a model file, no TensorFlow.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required

from pydantic import with_config
from typing_extensions import TypedDict

from tasks.durable import sha256_of
from tasks.errors import FanaoiError
from tasks.inference.model_file import ModelFileError, image_input_of, load_model
from tasks.inference.predictor import Predictor, class_names_of
from tasks.registry.store import (
    CARD_ATTR,
    CHAMPION_CARD,
    CHAMPION_MODEL,
    MODEL_SHA256,
    RegistryError,
    list_versions,
    version_name,
)
from tasks.shapes import STRICT, BadFile, IsoTime, checked

log = logging.getLogger(__name__)


@with_config(STRICT)
class ValidationMetrics(TypedDict, total=False):
    accuracy: float
    escape_rate: float
    escape_rate_upper95: float
    overkill_rate: float
    count: int


@with_config(STRICT)
class CardMetrics(TypedDict, total=False):
    validation: ValidationMetrics


@with_config(STRICT)
class Card(TypedDict, total=False):
    """A model card, as far as ``status``, ``champion`` and the integrity check read it."""

    version: Required[str]
    time: IsoTime
    action: str
    threshold: float | None
    data_snapshot: str | None
    metrics: CardMetrics
    model_sha256: str


@dataclass(frozen=True)
class Champion:
    """What the registry holds as champion. ``problem`` says why it is unusable, if it is."""

    card: dict[str, Any] | None
    model_path: Path
    problem: str | None

    @property
    def version(self) -> str | None:
        return self.card.get("version") if self.card else None


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
    return checked(Card, card, f"{model_path}: its embedded model card", "publish it again", ModelFileError)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A card file as a dict; None, with a warning, when it is missing, unreadable or not a card."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable model card (%s); using the card inside the model", path, exc)
        return None
    try:
        return checked(Card, card, str(path), "using the card inside the model")
    except BadFile as exc:
        log.warning("%s", exc)
        return None


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


def load_champion(registry_dir: Path | str) -> Predictor:
    """The champion of the registry with its card's mapping, preprocessing and threshold."""
    card = champion_card(registry_dir)
    return Predictor(
        load_model(Path(registry_dir) / CHAMPION_MODEL), image_input_of(card["preprocessing"]),
        class_names_of(card["class_mapping"]), float(card["threshold"]), card["version"],
        tuple(card["review_band"]) if card.get("review_band") else None,
    )
