"""The train stage: fit the classifier on the train split, watch the validation split.

``train_model`` is the pure part (images in, model and history out); ``run_train`` is
the stage: it reads the data folder and writes the candidate model and reports.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.dataset import LabeledImage, list_images, make_dataset, require_split, select
from tasks.model import build_model, save_model
from tasks.params import ModelParams, Params, TrainParams

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


def set_seeds(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic ops: same data, same model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _epoch_logger(
    epochs: int, images_per_epoch: int, report: Callable[[str], None]
) -> keras.callbacks.Callback:
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.started
            logs = logs or {}
            logs["seconds"] = seconds
            report(
                f"epoch {epoch + 1}/{epochs}: "
                + " ".join(f"{k}={logs[k]:.4f}" for k in HISTORY_COLUMNS[1:5] if k in logs)
                + f" ({seconds:.1f}s, {images_per_epoch / seconds:.0f} img/s)"
            )

    return EpochLogger()


def train_model(
    train_images: Sequence[LabeledImage],
    validation_images: Sequence[LabeledImage],
    model_params: ModelParams,
    train_params: TrainParams,
    checkpoint_dir: Path | None = None,
    report: Callable[[str], None] = log.info,
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Fit a fresh model; returns it and one row of metrics per epoch.

    With ``checkpoint_dir`` the state is saved after every epoch and a killed run resumes
    from the last finished epoch (Keras BackupAndRestore); the folder is removed on success.
    """
    import keras

    set_seeds(train_params.seed)
    model = build_model(model_params, train_params.learning_rate, train_params.jit_compile)
    train_data = make_dataset(
        train_images, model_params, train_params.batch_size,
        shuffle_seed=train_params.seed, shuffle_buffer=train_params.shuffle_buffer,
    )
    validation_data = make_dataset(validation_images, model_params, train_params.batch_size)
    callbacks = [_epoch_logger(train_params.epochs, len(train_images), report)]
    if checkpoint_dir is not None:
        callbacks.insert(0, keras.callbacks.BackupAndRestore(str(checkpoint_dir)))
    fit = model.fit(
        train_data,
        validation_data=validation_data,
        epochs=train_params.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=0,
    )
    history = [
        {"epoch": epoch + 1, **{k: float(v[index]) for k, v in fit.history.items()}}
        for index, epoch in enumerate(fit.epoch)
    ]
    return model, history


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
    params: Params,
    model_path: Path | str = "models/candidate.h5",
    reports_dir: Path | str = "reports",
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """The train stage: list, split, fit, then write the candidate .h5 and its reports."""
    model_path, reports_dir = Path(model_path), Path(reports_dir)
    images = list_images(params.data.dir, params.data)
    train_images = select(images, "train")
    validation_images = select(images, "validation")
    require_split(train_images, "train", params.data.dir)
    require_split(validation_images, "validation", params.data.dir)
    report(
        f"training {params.model.architecture} on {len(train_images)} images, "
        f"validating on {len(validation_images)}, {params.train.epochs} epochs"
    )
    started = time.perf_counter()
    model, history = train_model(
        train_images, validation_images, params.model, params.train,
        checkpoint_dir=Path(params.train.checkpoint_dir), report=report,
    )
    seconds = time.perf_counter() - started
    save_model(model, model_path, params.data.class_mapping, params.model)
    write_history(history, reports_dir / "history.csv")
    last = history[-1]
    summary = {
        "epochs": len(history),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(train_images) * len(history) / seconds, 1),
        "parameters": int(model.count_params()),
        "last_epoch": {k: round(v, 6) for k, v in last.items() if k not in ("epoch", "seconds")},
        "images": split_counts(images, params.data.classes),
        "class_mapping": params.data.class_mapping,
    }
    (reports_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report(f"wrote {model_path} ({summary['parameters']} parameters) in {seconds:.1f}s")
    return summary
