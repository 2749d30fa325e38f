"""Per-epoch callbacks of a training run: checkpoints to resume a killed run, the metrics
of each epoch, and the weights kept (the best epoch's, optionally a moving average).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.data.dataset import LabeledImage
from tasks.durable import atomic_write, write_json
from tasks.model.history import HISTORY_COLUMNS, kept_epoch
from tasks.model.warm_start import RANDOM_INIT
from tasks.params import ModelParams, TrainParams

if TYPE_CHECKING:
    import keras


class Checkpoint:
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


def epoch_recorder(
    epochs: int,
    images_per_epoch: int,
    rows: list[dict[str, float]],
    report: Callable[[str], None],
    checkpoint: Checkpoint | None,
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
    checkpoint: Checkpoint | None,
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
