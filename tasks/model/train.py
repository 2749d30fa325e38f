"""The train stage: fit the classifier on the train split, watch the validation split.

``train_model`` is the pure part (images in, model and history out); ``run_train`` is
the stage: it reads the data folder and writes the candidate model and reports.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.data.dataset import (
    LabeledImage,
    make_dataset,
    require_split,
    resolve_color_mode,
    select,
)
from tasks.data.image_manifest import read_images
from tasks.durable import atomic_write, sha256_of, write_json, write_stage_report
from tasks.errors import FanaoiError
from tasks.inference.model_file import load_model, read_model_metadata
from tasks.model.network import build_model, save_model
from tasks.params import ModelParams, Params, TrainParams
from tasks.registry.champion import read_champion
from tasks.registry.store import CHAMPION_MODEL

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# No wall time here: history.csv is a DVC out and plot, and the same data and params must
# write the same bytes whichever driver ran (the flow or `dvc repro`). Epoch times go to
# the log and the run's total to train.json.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
RANDOM_INIT = {"from": "random"}


class WarmStartError(FanaoiError):
    """``train.init_from: champion`` cannot be honoured; the message names the file and the fix."""


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


def find_warm_start(params: Params) -> WarmStart | None:
    """The registry champion when ``train.init_from`` is champion (checked usable), else None."""
    if params.train.init_from is None:
        return None
    registry_dir = Path(params.registry.dir)
    fix = "set train.init_from: null in params.yaml to start from random weights"
    champion = read_champion(registry_dir)
    if champion is None:
        raise WarmStartError(
            f"{registry_dir / CHAMPION_MODEL}: train.init_from is champion but the registry has "
            f"no champion; publish one first (`fanaoi gate`) or {fix}"
        )
    if champion.problem:
        raise WarmStartError(f"{champion.problem}; or {fix}")
    mapping = read_model_metadata(champion.model_path)["class_mapping"]
    if mapping != params.data.class_mapping:
        raise WarmStartError(
            f"{champion.model_path}: champion {champion.version} has class mapping {mapping}, "
            f"data.classes gives {params.data.class_mapping}; its output would mean the opposite "
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


def set_seeds(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic ops: same data, same model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class _Checkpoint:
    """Per-epoch state of one training run, so a killed run resumes where it stopped.

    Keras' BackupAndRestore keeps the weights and optimizer; this adds the finished
    epochs' metrics and a fingerprint of the run, so a backup left by a run with other
    params or data is discarded instead of resumed.
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.journal = folder / "history.jsonl"
        marker = folder / "fingerprint"
        if folder.exists() and (not marker.exists() or marker.read_text() != fingerprint):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)

    def finished_epochs(self) -> list[dict[str, float]]:
        metadata = self.folder / "training_metadata.json"
        if not metadata.exists() or not self.journal.exists():
            return []
        done = json.loads(metadata.read_text())["epoch"]
        rows = [json.loads(line) for line in self.journal.read_text().splitlines() if line]
        return [row for row in rows if row["epoch"] <= done]

    def record(self, row: dict[str, float]) -> None:
        with self.journal.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def run_fingerprint(
    train_images: Sequence[LabeledImage],
    model_params: ModelParams,
    train_params: TrainParams,
    init: dict[str, Any] = RANDOM_INIT,
) -> str:
    """Same fingerprint, same run: params (init_from among them), initial weights and data."""
    content = json.dumps(
        [model_params.model_dump(), train_params.model_dump(), init,
         sorted(image.sha256 for image in train_images)],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(content.encode()).hexdigest()


def _epoch_recorder(
    epochs: int,
    images_per_epoch: int,
    rows: list[dict[str, float]],
    report: Callable[[str], None],
    checkpoint: _Checkpoint | None,
) -> keras.callbacks.Callback:
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.started
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            row["seconds"] = seconds
            rows.append(row)
            if checkpoint is not None:
                checkpoint.record(row)
            report(
                f"epoch {epoch + 1}/{epochs}: "
                + " ".join(f"{k}={row[k]:.4f}" for k in HISTORY_COLUMNS[1:] if k in row)
                + f" ({seconds:.1f}s, {images_per_epoch / seconds:.0f} img/s)"
            )

    return EpochRecorder()


def best_epoch_keeper(
    patience: int | None,
    rows: list[dict[str, float]],
    checkpoint: _Checkpoint | None,
    average_momentum: float | None = None,
    tolerance: float = 0.0,
) -> keras.callbacks.Callback:
    """Keep the weights of the latest epoch whose validation loss is within ``tolerance`` of
    the lowest (``kept_epoch``); stop after ``patience`` epochs without a lower validation
    loss; put the kept weights back when training ends.

    With ``average_momentum`` the model that is validated, kept and saved is an exponential
    moving average of the weights after every step (Polyak averaging; batch-norm statistics
    included), which evens out where the last steps of an epoch happened to land.

    The kept weights go to the checkpoint folder too, so a resumed run still ends with the
    kept epoch's weights even when that epoch ran before the kill; so does the average.
    """
    import keras
    import numpy as np

    class BestEpoch(keras.callbacks.Callback):
        def set_model(self, model: keras.Model) -> None:
            # fit() calls this before it builds its train function, which must already
            # hold the average's update.
            super().set_model(model)
            self.average = None if average_momentum is None else _WeightAverage(model, average_momentum)

        def on_train_begin(self, logs: dict | None = None) -> None:
            folder = None if checkpoint is None else checkpoint.folder
            self.kept_file = None if folder is None else folder / "best.weights.h5"
            self.average_file = None if folder is None else folder / "average.npz"
            self.kept_weights = None
            self.lowest = min(rows, key=lambda row: row["val_loss"]) if rows else None
            self.kept = kept_epoch(rows, tolerance) if rows else None
            if self.kept is not None and _epoch_saved_in(self.kept_file) != self.kept["epoch"]:
                self.kept = None  # the saved weights are not that epoch's: the next epoch's replace them
            self.trained_weights = None
            if self.average is not None and rows and self.average_file is not None and self.average_file.exists():
                with np.load(self.average_file) as saved:
                    if int(saved["epoch"]) == rows[-1]["epoch"]:
                        self.average.resume([saved[f"w{i}"] for i in range(len(saved.files) - 1)])

        def _use_average(self) -> None:
            if self.average is not None and self.trained_weights is None:
                self.trained_weights = self.model.get_weights()
                self.model.set_weights(self.average.values())

        def _use_trained(self) -> None:
            if self.trained_weights is not None:
                self.model.set_weights(self.trained_weights)
                self.trained_weights = None

        def on_test_begin(self, logs: dict | None = None) -> None:
            self._use_average()

        def on_test_end(self, logs: dict | None = None) -> None:
            self._use_trained()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = rows[-1]
            if self.average is not None and self.average_file is not None:
                arrays = {f"w{i}": value for i, value in enumerate(self.average.values())}
                atomic_write(self.average_file, lambda handle: np.savez(handle, epoch=row["epoch"], **arrays))
            if self.lowest is None or row["val_loss"] < self.lowest["val_loss"]:
                self.lowest = row
            if self.kept is None or row["val_loss"] <= self.lowest["val_loss"] + tolerance:
                self.kept = row
                self._use_average()
                if self.kept_file is not None:
                    self.model.save_weights(self.kept_file)
                    write_json(self.kept_file.with_suffix(".json"), {"epoch": row["epoch"]})
                else:
                    self.kept_weights = self.model.get_weights()
                self._use_trained()
            if patience is not None and row["epoch"] - self.lowest["epoch"] >= patience:
                self.model.stop_training = True

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.kept is None:
                return
            if self.kept_file is not None:
                self.model.load_weights(self.kept_file)
            else:
                self.model.set_weights(self.kept_weights)

    return BestEpoch()


class _WeightAverage:
    """Exponential moving average of every weight of a model, batch-norm statistics included,
    updated after every optimizer step.

    The update runs inside the model's compiled train step, so it costs no call from Python
    and stays per step when ``steps_per_execution`` runs many steps per call (Keras calls
    batch-end callbacks once per call). The first update copies the weights (momentum 0),
    unless ``resume`` carried on a killed run's average.
    """

    def __init__(self, model: keras.Model, momentum: float) -> None:
        import tensorflow as tf

        self.means = [tf.Variable(value, trainable=False) for value in model.get_weights()]
        self.started = tf.Variable(False, trainable=False)
        self.momentum = momentum
        self.weights = list(model.weights)
        train_step = model.train_step

        def averaged_train_step(data: Any) -> Any:
            logs = train_step(data)
            self.blend()
            return logs

        # An instance attribute, not a subclass: the saved .h5 stays a plain Sequential.
        model.train_step = averaged_train_step

    def blend(self) -> None:
        """Take the current weights into the average (TensorFlow ops: traced into the train step)."""
        import tensorflow as tf

        momentum = tf.where(self.started, self.momentum, 0.0)
        for mean, weight in zip(self.means, self.weights, strict=True):
            mean.assign(momentum * mean + (1 - momentum) * tf.cast(weight.value, mean.dtype))
        self.started.assign(True)

    def resume(self, values: list[Any]) -> None:
        for mean, value in zip(self.means, values, strict=True):
            mean.assign(value)
        self.started.assign(True)

    def values(self) -> list[Any]:
        return [mean.numpy() for mean in self.means]


def _epoch_saved_in(weights_file: Path | None) -> int | None:
    """The epoch whose weights ``weights_file`` holds, per its sidecar; None when unknown."""
    if weights_file is None or not weights_file.exists() or not weights_file.with_suffix(".json").exists():
        return None
    return json.loads(weights_file.with_suffix(".json").read_text())["epoch"]


def learning_rate_at(epoch: int, train_params: TrainParams) -> float:
    """Learning rate for a 0-based epoch: constant, or cosine from the base rate towards 0
    over the epoch cap (halfway through, half the base rate)."""
    if train_params.lr_schedule == "constant":
        return train_params.learning_rate
    return 0.5 * train_params.learning_rate * (1 + math.cos(math.pi * epoch / train_params.epochs))


def class_weights(images: Sequence[LabeledImage], mode: str) -> dict[int, float] | None:
    """``balanced``: each class weighs in as if both had the same number of images."""
    if mode == "none":
        return None
    counts = {label: sum(1 for image in images if image.label == label) for label in (0, 1)}
    return {label: len(images) / (2 * count) for label, count in counts.items() if count}


def train_model(
    train_images: Sequence[LabeledImage],
    validation_images: Sequence[LabeledImage],
    model_params: ModelParams,
    train_params: TrainParams,
    *,
    checkpoint_dir: Path | None = None,
    report: Callable[[str], None] = log.info,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    warm_start: WarmStart | None = None,
    validation_batch_size: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Fit a model from random weights, or from the champion's with ``warm_start``.

    Returns the model and one row of metrics per epoch. With ``checkpoint_dir`` the state
    is saved after every epoch and a killed run with the same params, initial weights and
    data resumes from its last finished epoch; the folder is removed when training completes.
    A split above ``train.cache_max_mb`` is cached to a file under ``cache_dir``
    (``make_dataset``); without it, decoded again every epoch.
    """
    import keras

    set_seeds(train_params.seed)
    model = build_model(
        model_params, train_params.learning_rate, train_params.jit_compile, train_params.steps_per_execution
    )
    if warm_start is not None:
        load_warm_start(model, warm_start)
        report(f"warm start from champion {warm_start.version} ({warm_start.path})")
    train_data = make_dataset(
        train_images, model_params, train_params.batch_size,
        shuffle_seed=train_params.seed, shuffle_buffer=train_params.shuffle_buffer,
        augment=train_params.augment, cache_max_mb=train_params.cache_max_mb, cache_dir=cache_dir,
    )
    validation_data = make_dataset(
        validation_images, model_params, validation_batch_size or train_params.batch_size,
        cache_max_mb=train_params.cache_max_mb, cache_dir=cache_dir,
    )
    rows: list[dict[str, float]] = []
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(train_images, model_params, train_params, initial_weights(warm_start))
        checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint)
        rows.extend(checkpoint.finished_epochs())
        if rows:
            report(f"resuming from the checkpoint after epoch {rows[-1]['epoch']}")
    # Order matters: the recorder writes the epoch's row that the keeper reads, and the
    # keeper restores the best weights before BackupAndRestore deletes the checkpoint folder.
    callbacks: list[keras.callbacks.Callback] = [
        _epoch_recorder(train_params.epochs, len(train_images), rows, report, checkpoint),
        best_epoch_keeper(train_params.early_stopping_patience, rows, checkpoint, train_params.average_momentum,
                          train_params.keep_tolerance),
    ]
    if checkpoint_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(str(checkpoint_dir)))
    if train_params.lr_schedule != "constant":
        callbacks.append(keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(epoch, train_params)))
    model.fit(
        train_data,
        validation_data=validation_data,
        epochs=train_params.epochs,
        callbacks=[*callbacks, *extra_callbacks],
        class_weight=class_weights(train_images, train_params.class_weight),
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=0,
    )
    return model, rows


def kept_epoch(history: Sequence[dict[str, float]], tolerance: float = 0.0) -> dict[str, float]:
    """The epoch whose weights training keeps: the latest whose validation loss is within
    ``tolerance`` of the lowest (0: the lowest itself, the latest on ties).

    The validation loss of a few hundred images is flat and noisy late in training: the
    lowest is often an earlier epoch by a margin no larger than that noise, while the later
    epochs, trained on with a smaller learning rate, score as well or better on new images.
    """
    lowest = min(row["val_loss"] for row in history)
    return max((row for row in history if row["val_loss"] <= lowest + tolerance), key=lambda row: row["epoch"])


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv back as one row of floats per epoch."""
    with path.open(encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def write_history(history: Sequence[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6f}" if k != "epoch" else row[k]) for k in HISTORY_COLUMNS if k in row})


def split_counts(images: Sequence[LabeledImage], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        split: {name: sum(1 for i in select(images, split) if i.class_name == name) for name in classes}
        for split in ("train", "validation", "test")
    }


def run_train(
    params: Params, model_path: Path | str | None = None, reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """The train stage: read validate's manifest, fit, then write the candidate .h5 and its reports."""
    model_path, reports_dir = params.paths.chosen(model_path, reports_dir)
    images = read_images(reports_dir, params.data)
    train_images = select(images, "train")
    validation_images = select(images, "validation")
    require_split(train_images, "train", params.data.dir)
    require_split(validation_images, "validation", params.data.dir)
    report(
        f"training {params.model.architecture} on {len(train_images)} images, "
        f"validating on {len(validation_images)}, {params.train.epochs} epochs"
    )
    warm_start = find_warm_start(params)
    init = initial_weights(warm_start)
    model_params = resolve_color_mode(train_images, params.model)
    if model_params.color_mode != params.model.color_mode:
        report(f"model.color_mode auto: {model_params.color_mode} (from the train images)")
    started = time.perf_counter()
    model, history = train_model(
        train_images, validation_images, model_params, params.train,
        checkpoint_dir=Path(params.train.checkpoint_dir), report=report, warm_start=warm_start,
        validation_batch_size=params.evaluate.batch_size, cache_dir=Path(params.validate.cache_dir),
    )
    seconds = time.perf_counter() - started
    kept = kept_epoch(history, params.train.keep_tolerance)
    save_model(model, model_path, params.data.class_mapping, model_params,
               training={"init": init, "best_epoch": int(kept["epoch"]), "epochs_run": len(history)})
    write_history(history, reports_dir / "history.csv")
    summary = {
        "epochs": len(history),
        "kept_epoch": int(kept["epoch"]),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(train_images) * len(history) / seconds, 1),
        "parameters": int(model.count_params()),
        "init": init,
        "first_layer_init": params.model.first_layer_init,
        "color_mode": model_params.color_mode,
        "kept_epoch_metrics": {k: round(v, 6) for k, v in kept.items() if k not in ("epoch", "seconds")},
        "images": split_counts(images, params.data.classes),
        "class_mapping": params.data.class_mapping,
    }
    write_stage_report(reports_dir / "train.json", summary, {
        **{key: summary[key] for key in ("epochs", "kept_epoch", "seconds", "images_per_second")},
        "kept_epoch_metrics": {key: summary["kept_epoch_metrics"][key] for key in HISTORY_COLUMNS[1:]},
    })
    report(
        f"wrote {model_path} ({summary['parameters']} parameters) in {seconds:.1f}s, "
        f"weights of epoch {summary['kept_epoch']} of {summary['epochs']} (the latest within "
        f"{params.train.keep_tolerance} of the lowest validation loss)"
    )
    return summary
