"""Warm start: begin training from the registry champion's weights instead of random ones.

``find_warm_start`` checks the champion that the entry point read from the registry (when
``train.init_from`` is champion; the model package never reads the registry itself);
``load_warm_start`` copies its weights into the freshly built model; ``initial_weights``
is what the run's records say about where it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.durable import sha256_of
from tasks.errors import FanaoiError
from tasks.inference.model_file import load_model, read_model_metadata

if TYPE_CHECKING:
    import keras

RANDOM_INIT = {"from": "random"}


class WarmStartError(FanaoiError):
    """``train.init_from: champion`` cannot be honoured; the message names the file and the fix."""


class ChampionFile(Protocol):
    """What the registry says of its champion (tasks.registry.champion.Champion)."""

    model_path: Path
    version: str | None
    problem: str | None


@dataclass(frozen=True)
class WarmStart:
    """The champion a run starts from instead of random weights."""

    path: Path
    version: str | None
    sha256: str


def initial_weights(warm_start: WarmStart | None) -> dict[str, Any]:
    """What the checkpoint fingerprint, train.json and the model card say about the start."""
    if warm_start is None:
        return RANDOM_INIT
    return {"from": "champion", "version": warm_start.version, "sha256": warm_start.sha256}


def find_warm_start(
    init_from: str | None, champion: ChampionFile | None, champion_path: Path, class_mapping: dict[str, int],
) -> WarmStart | None:
    """``champion`` (read from ``champion_path``, None when the registry has none) when
    ``train.init_from`` is champion, checked usable; None for random weights."""
    if init_from is None:
        return None
    fix = "set train.init_from: null in params.yaml to start from random weights"
    if champion is None:
        raise WarmStartError(
            f"{champion_path}: train.init_from is champion but the registry has "
            f"no champion; publish one first (`fanaoi gate`) or {fix}"
        )
    if champion.problem:
        raise WarmStartError(f"{champion.problem}; or {fix}")
    mapping = read_model_metadata(champion.model_path)["class_mapping"]
    if mapping != class_mapping:
        raise WarmStartError(
            f"{champion.model_path}: champion {champion.version} has class mapping {mapping}, "
            f"data.classes gives {class_mapping}; its output would mean the opposite "
            f"class: {fix}"
        )
    return WarmStart(champion.model_path, champion.version, sha256_of(champion.model_path))


def load_warm_start(model: keras.Model, warm_start: WarmStart) -> None:
    """Copy the champion's weights into ``model``; layers and shapes must match."""
    import keras

    source = load_model(warm_start.path)
    fix = (
        "set model.input_size, color_mode, conv_filters, dense_units, standardize and architecture "
        "to the champion's (see `fanaoi champion --json`), or set train.init_from: null"
    )
    if tuple(source.input_shape[1:]) != tuple(model.input_shape[1:]):
        raise WarmStartError(
            f"{warm_start.path}: champion {warm_start.version} takes input "
            f"{tuple(source.input_shape[1:])}, model params build {tuple(model.input_shape[1:])}; {fix}"
        )
    # Weightless layers change what the weights mean without changing their shapes: a
    # champion trained on raw pixels would start a standardized model from the wrong place.
    # Dropout is the exception: it passes its input through whenever the model predicts.
    their_layers, our_layers = ([layer.name for layer in m.layers if not isinstance(layer, keras.layers.Dropout)]
                                for m in (source, model))
    if their_layers != our_layers:
        raise WarmStartError(
            f"{warm_start.path}: champion {warm_start.version} has layers {', '.join(their_layers)}; "
            f"model params build {', '.join(our_layers)}; {fix}"
        )
    theirs, ours = source.weights, model.weights
    for index in range(max(len(theirs), len(ours))):
        their_shape = tuple(theirs[index].shape) if index < len(theirs) else None
        our_shape = tuple(ours[index].shape) if index < len(ours) else None
        if their_shape != our_shape:
            name = (ours[index] if index < len(ours) else theirs[index]).path
            raise WarmStartError(
                f"{warm_start.path}: champion {warm_start.version} has weight {index} ({name}) "
                f"of shape {their_shape}, model params give {our_shape}; {fix}"
            )
    model.set_weights(source.get_weights())
