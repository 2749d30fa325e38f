"""The train stage: fit the classifier on the train split, watch the validation split.

``train_model`` is the pure part (images in, model and history out); ``run_train`` is
the stage: it reads the data folder and writes the candidate model and reports. The
per-epoch callbacks are in ``tasks.model.checkpoints``, the start from the champion's
weights in ``tasks.model.warm_start``, history.csv in ``tasks.model.history``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
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
from tasks.durable import write_stage_report
from tasks.model.checkpoints import Checkpoint, best_epoch_keeper, epoch_recorder, run_fingerprint
from tasks.model.history import HISTORY_COLUMNS, kept_epoch, write_history
from tasks.model.network import build_model, save_model
from tasks.model.warm_start import WarmStart, WarmStartError, initial_weights, load_warm_start
from tasks.params import ModelParams, Params, TrainParams

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def set_seeds(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic ops: same data, same model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


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
        checkpoint = Checkpoint(Path(checkpoint_dir), fingerprint)
        rows.extend(checkpoint.finished_epochs())
        if rows:
            report(f"resuming from the checkpoint after epoch {rows[-1]['epoch']}")
    # Order matters: the recorder writes the epoch's row that the keeper reads, and the
    # keeper restores the best weights before BackupAndRestore deletes the checkpoint folder.
    callbacks: list[keras.callbacks.Callback] = [
        epoch_recorder(train_params.epochs, len(train_images), rows, report, checkpoint),
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


def split_counts(images: Sequence[LabeledImage], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        split: {name: sum(1 for i in select(images, split) if i.class_name == name) for name in classes}
        for split in ("train", "validation", "test")
    }


def run_train(
    params: Params, model_path: Path | str | None = None, reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info, *, warm_start: WarmStart | None = None,
) -> dict[str, Any]:
    """The train stage: read validate's manifest, fit, then write the candidate .h5 and its reports.

    ``warm_start``: the champion to start from, which the entry point resolves from the
    registry when train.init_from is champion (tasks.registry.warm_start.champion_warm_start).
    """
    if params.train.init_from is not None and warm_start is None:
        raise WarmStartError(f"train.init_from is {params.train.init_from} but no champion was handed to "
                             f"training; run it with `fanaoi train` or the nightly flow, which read the registry")
    model_path, reports_dir = params.paths.chosen(model_path, reports_dir)
    images = read_images(reports_dir, params.data, params.paths.reports)
    train_images = select(images, "train")
    validation_images = select(images, "validation")
    require_split(train_images, "train", params.data.dir)
    require_split(validation_images, "validation", params.data.dir)
    report(
        f"training {params.model.architecture} on {len(train_images)} images, "
        f"validating on {len(validation_images)}, {params.train.epochs} epochs"
    )
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
