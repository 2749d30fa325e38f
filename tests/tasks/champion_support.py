"""Models and registries shared by the gate, registry, predict and CLI tests.

Training a usable model and publishing it (which loads it in a fresh process) take
seconds each, so each is done once per session under the session's temp folder; tests
copy the results and change only their copies.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from flows.params import write_params
from tasks.data.dataset import list_images, select
from tasks.params import Params, replace
from tests.conftest import BASE, tiny_params, write_manifest

# Enough epochs for the tiny model to separate the tiny fans (the 3-epoch model of
# `trained_workspace` still predicts one class for everything).
GOOD_EPOCHS = 15
GOOD_LEARNING_RATE = 0.003


def gate_params(data_dir: Path, registry_dir: Path, **gate: object) -> Params:
    """Tiny params with floors a 29-image validation split can meet and a local registry."""
    params = tiny_params(data_dir, epochs=GOOD_EPOCHS, learning_rate=GOOD_LEARNING_RATE)
    settings = {"min_accuracy": 0.8, "max_escape_rate": 0.2, "smoke_images": 4, **gate}
    return replace(
        params,
        gate=replace(BASE.gate, **settings),
        registry=replace(BASE.registry, dir=str(registry_dir), lock_timeout=2.0),
    )


def train_good_model(params: Params, path: Path) -> Path:
    """Train on the train split (no checkpoints, no reports) and save to ``path``."""
    from tasks.model.network import save_model
    from tasks.model.train import train_model

    images = list_images(params.data.dir, params.data)
    model, _ = train_model(select(images, "train"), select(images, "validation"), params.model, params.train)
    return save_model(model, path, params.data.class_mapping, params.model)


def gate_candidate(params: Params, candidate: Path, reports: Path, **options: object) -> dict:
    """``run_gate`` as the pipeline runs it: on validate's manifest and evaluate's scores of ``candidate``."""
    from tasks.data.image_manifest import manifest_path, read_images
    from tasks.inference.scores import score_candidate
    from tasks.registry.gate import run_gate

    if not manifest_path(reports).is_file():
        write_manifest(params, reports)
    score_candidate(candidate, read_images(reports, params.data), reports, params.evaluate,
                    params.gate.target_escape_rate)
    return run_gate(params, candidate, reports, **options)


def save_random_model(params: Params, path: Path, seed: int = 7) -> Path:
    """An untrained model: as bad as a candidate gets, and different from every trained one."""
    import keras

    from tasks.model.network import build_model, save_model

    keras.utils.set_random_seed(seed)
    model = build_model(params.model, params.train.learning_rate)
    return save_model(model, path, params.data.class_mapping, params.model)


@functools.cache
def good_model(data_dir: Path, base: Path) -> Path:
    return train_good_model(gate_params(data_dir, base / "unused"), base / "good" / "model.h5")


@functools.cache
def one_version_registry(data_dir: Path, base: Path) -> Path:
    """A registry whose champion v0001 is the good model, published through the gate."""
    from tasks.registry.publish import publish

    registry = base / "registry-v1"
    params = gate_params(data_dir, registry)
    candidate = good_model(data_dir, base)
    result = gate_candidate(params, candidate, base / "reports-v1")
    assert result["decision"] == "promote", result["reasons"]
    publish(candidate, result, params)
    return registry


@functools.cache
def two_version_registry(data_dir: Path, base: Path) -> Path:
    """v0001 (good), then v0002 (an untrained model) forced by an operator via the CLI."""
    from flows.cli import main

    registry = base / "registry-v2"
    shutil.copytree(one_version_registry(data_dir, base), registry)
    params_file = write_params_file(base / "params-v2.yaml", data_dir, registry)
    weak = save_random_model(gate_params(data_dir, registry), base / "weak" / "model.h5")
    code = main([
        "--params", str(params_file), "promote", "--force", "--reason", "line test",
        "--model", str(weak), "--reports", str(base / "reports-v2"),
    ])
    assert code == 0
    return registry


def write_params_file(path: Path, data_dir: Path, registry_dir: Path) -> Path:
    """params.yaml for CLI tests, the same settings as gate_params."""
    return write_params(gate_params(data_dir, registry_dir), path)


def copy_registry(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def flip_weight_bytes(model_path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes inside the largest weight array of an .h5, leaving its
    structure (and the embedded model card) readable: the silent damage of a bad disk."""
    import h5py

    arrays: list = []
    with h5py.File(model_path, "r") as handle:
        handle.visititems(lambda _, item: arrays.append(item) if isinstance(item, h5py.Dataset) else None)
        largest = max(arrays, key=lambda item: item.nbytes)
        offset = largest.id.get_offset()
    with model_path.open("r+b") as raw:
        raw.seek(offset)
        chunk = raw.read(count)
        raw.seek(offset)
        raw.write(bytes(b ^ 0xFF for b in chunk))
def review_band_registry(data_dir: Path, base: Path, registry: Path, review_band: tuple[float, float]) -> Path:
    """A registry whose champion (the good model) was published with a review band."""
    from tasks.registry.publish import publish

    params = gate_params(data_dir, registry)
    params = replace(params, evaluate=replace(params.evaluate, review_band=review_band))
    candidate = good_model(data_dir, base)
    result = gate_candidate(params, candidate, registry.parent / "reports-review")
    assert result["decision"] == "promote", result["reasons"]
    publish(candidate, result, params)
    return registry
