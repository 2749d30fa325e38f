"""The train stage: fit the classifier on the train split, watch the validation split.

``train_model`` is the pure part (images in, model and history out); ``run_train`` is
the stage: it reads the data folder and writes the candidate model and reports.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
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
    train_images: Sequence[LabeledImage], model_params: ModelParams, train_params: TrainParams
) -> str:
    content = json.dumps(
        [dataclasses.asdict(model_params), dataclasses.asdict(train_params),
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
                + " ".join(f"{k}={row[k]:.4f}" for k in HISTORY_COLUMNS[1:5] if k in row)
                + f" ({seconds:.1f}s, {images_per_epoch / seconds:.0f} img/s)"
            )

    return EpochRecorder()


def train_model(
    train_images: Sequence[LabeledImage],
    validation_images: Sequence[LabeledImage],
    model_params: ModelParams,
    train_params: TrainParams,
    *,
    checkpoint_dir: Path | None = None,
    report: Callable[[str], None] = log.info,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Fit a fresh model; returns it and one row of metrics per epoch.

    With ``checkpoint_dir`` the state is saved after every epoch and a killed run with
    the same params and data resumes from its last finished epoch; the folder is removed
    when training completes.
    """
    import keras

    set_seeds(train_params.seed)
    model = build_model(model_params, train_params.learning_rate, train_params.jit_compile)
    train_data = make_dataset(
        train_images, model_params, train_params.batch_size,
        shuffle_seed=train_params.seed, shuffle_buffer=train_params.shuffle_buffer,
    )
    validation_data = make_dataset(validation_images, model_params, train_params.batch_size)
    rows: list[dict[str, float]] = []
    checkpoint = None
    callbacks: list[keras.callbacks.Callback] = []
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(train_images, model_params, train_params)
        checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint)
        rows.extend(checkpoint.finished_epochs())
        if rows:
            report(f"resuming from the checkpoint after epoch {rows[-1]['epoch']}")
        callbacks.append(keras.callbacks.BackupAndRestore(str(checkpoint_dir)))
    callbacks.append(_epoch_recorder(train_params.epochs, len(train_images), rows, report, checkpoint))
    model.fit(
        train_data,
        validation_data=validation_data,
        epochs=train_params.epochs,
        callbacks=[*callbacks, *extra_callbacks],
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=0,
    )
    return model, rows


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
