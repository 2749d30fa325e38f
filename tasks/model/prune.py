"""Filter pruning: drop each Conv2D layer's weakest filters, fine-tune, compare before and after.

A filter's strength is the L1 norm of its kernel (sum of absolute weights), the seed's
selection criterion: a filter with small weights produces small activations and
contributes little to the layers after it. Each Conv2D layer loses the same fraction of
its filters; the filters are ranked on the trained kernels, before any input channel is
removed, so the ranking of a layer does not depend on the pruning of the one before.

The pruned model is a new, smaller Keras model (fewer filters, the following layer's
input weights sliced to match), not a masked copy, so it is faster and smaller on disk.
It is saved with the source's class mapping and preprocessing and goes through the gate
like any other candidate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data.dataset import LabeledImage, decode_all, labels_of, make_dataset, require_split, select
from tasks.data.image_manifest import read_images
from tasks.durable import atomic_replace, sha256_of, write_json
from tasks.errors import FanaoiError
from tasks.inference.metrics import classification_metrics
from tasks.inference.model_file import load_model, model_params_from_file, read_model_metadata
from tasks.inference.predictor import predict_probabilities
from tasks.model.network import fuse_batch_norm, save_model
from tasks.params import ImageInput, Params

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

CRITERION = "L1 norm of each Conv2D filter's kernel, lowest removed"
SPEED_REPEATS = 5
# Layers without weights that keep the channel axis as it is: the kept channel indices
# pass through them unchanged.
_CHANNEL_PRESERVING = (
    "MaxPooling2D", "AveragePooling2D", "Dropout", "Activation", "ReLU",
    "GlobalAveragePooling2D", "GlobalMaxPooling2D",
)


class PruneError(FanaoiError):
    """A model cannot be pruned as asked; the message names the file and the fix."""


def filter_norms(kernel: np.ndarray) -> np.ndarray:
    """L1 norm of each output filter of a Conv2D kernel (height, width, in, out)."""
    return np.abs(kernel).sum(axis=(0, 1, 2))


def filters_to_keep(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending) of the filters that survive; at least one always does."""
    norms = filter_norms(kernel)
    removed = min(int(fraction * len(norms)), len(norms) - 1)
    weakest_first = np.argsort(norms, kind="stable")
    return np.sort(weakest_first[removed:])


def _flattened(shape: Sequence[int], channels: np.ndarray) -> np.ndarray:
    """Positions in a Flatten output (channels-last: height, width, channel) of the kept channels."""
    height, width, depth = shape
    return np.arange(height * width * depth).reshape(height, width, depth)[:, :, channels].reshape(-1)


def prune_model(model: keras.Model, fraction: float) -> tuple[keras.Model, list[dict[str, Any]]]:
    """A smaller copy of a Sequential CNN without the weakest ``fraction`` of each Conv2D's filters.

    Returns the new model (weights copied, not compiled) and, per Conv2D layer, which
    filters were removed with their L1 norms.
    """
    import keras

    if not isinstance(model, keras.Sequential):
        raise PruneError(f"model {model.name!r} is not a Sequential model; only those can be pruned")
    layers, weights, plan = [], [], []
    kept: np.ndarray | None = None  # indices of the previous layer's outputs that survive
    for layer in model.layers:
        config, values, kind = layer.get_config(), layer.get_weights(), type(layer).__name__
        if isinstance(layer, keras.layers.Conv2D):
            kernel, *bias = values
            keep = filters_to_keep(kernel, fraction)
            norms = filter_norms(kernel)
            removed = np.setdiff1d(np.arange(len(norms)), keep)
            plan.append({
                "layer": layer.name, "filters_before": len(norms), "filters_after": len(keep),
                "removed": removed.tolist(), "removed_l1": norms[removed].round(6).tolist(),
                "kept_min_l1": float(norms[keep].min()),
            })
            if kept is not None:
                kernel = kernel[:, :, kept, :]
            values = [kernel[..., keep], *(b[keep] for b in bias)]
            config["filters"] = len(keep)
            kept = keep
        elif isinstance(layer, keras.layers.BatchNormalization):
            # gamma, beta, moving mean and variance: one entry per channel of the Conv2D before
            values = [v if kept is None else v[kept] for v in values]
        elif isinstance(layer, keras.layers.Flatten):
            if kept is not None:
                kept = _flattened(layer.input.shape[1:], kept)
        elif kept is None and not values and isinstance(layer, (keras.layers.Reshape, keras.layers.LayerNormalization)):
            pass  # the input standardization: no weights, and no pruned channel before it
        elif isinstance(layer, keras.layers.Dense):
            kernel, *bias = values
            values = [kernel if kept is None else kernel[kept], *bias]
            kept = None  # Dense units are not pruned
        elif kind not in _CHANNEL_PRESERVING or values:
            raise PruneError(
                f"model {model.name!r}: cannot prune through layer {layer.name} ({kind}); "
                f"pruning supports Conv2D, BatchNormalization, pooling, Dropout, Flatten and Dense layers"
            )
        layers.append(type(layer).from_config(config))
        weights.append(values)
    pruned = keras.Sequential([keras.Input(shape=model.input_shape[1:]), *layers], name=model.name)
    for layer, values in zip(pruned.layers, weights, strict=True):
        layer.set_weights(values)
    return pruned, plan


def fine_tune(
    model: keras.Model,
    train_images: Sequence[LabeledImage],
    validation_images: Sequence[LabeledImage],
    model_params: ImageInput,
    *,
    params: Params,
    epochs: int,
    report: Callable[[str], None] = log.info,
) -> list[dict[str, float]]:
    """Train the pruned model a few epochs (seeded) so the layers after the cut adapt."""
    import keras

    from tasks.model.train import set_seeds

    set_seeds(params.train.seed)
    fuse_batch_norm(model)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=params.prune.learning_rate, name="adam"),
        loss="binary_crossentropy", metrics=["accuracy"],
    )
    if epochs == 0:
        return []
    batch, cache_max_mb, cache_dir = params.train.batch_size, params.train.cache_max_mb, params.validate.cache_dir
    history = model.fit(
        make_dataset(train_images, model_params, batch, shuffle_seed=params.train.seed,
                     shuffle_buffer=params.train.shuffle_buffer, cache_max_mb=cache_max_mb, cache_dir=cache_dir),
        validation_data=make_dataset(validation_images, model_params, params.evaluate.batch_size,
                                     cache_max_mb=cache_max_mb, cache_dir=cache_dir),
        epochs=epochs, shuffle=False, verbose=0,
    ).history
    rows = [{"epoch": index + 1, **{key: float(values[index]) for key, values in history.items()}}
            for index in range(epochs)]
    for row in rows:
        report(f"fine-tune epoch {row['epoch']}/{epochs}: loss={row['loss']:.4f} "
               f"val_accuracy={row['val_accuracy']:.4f}")
    return rows


def speed_batch(images: Sequence[LabeledImage], model_params: ImageInput, count: int) -> np.ndarray:
    """``count`` decoded images (the given ones repeated as needed), to time predictions on."""
    decoded = decode_all(images, model_params)
    return decoded[np.arange(count) % len(decoded)]


def images_per_second(models: Sequence[keras.Model], batch: np.ndarray, batch_size: int) -> list[float]:
    """Predict throughput of each model: the best of a few rounds after a warm-up call.

    The models take turns within each round, so a machine busy with other work slows them
    alike instead of favouring whichever was timed in a quiet moment.
    """
    for model in models:
        model.predict(batch, batch_size=batch_size, verbose=0)
    best = [float("inf")] * len(models)
    for _ in range(SPEED_REPEATS):
        for index, model in enumerate(models):
            started = time.perf_counter()
            model.predict(batch, batch_size=batch_size, verbose=0)
            best[index] = min(best[index], time.perf_counter() - started)
    return [round(len(batch) / seconds, 1) for seconds in best]


def measure(
    model: keras.Model,
    file_path: Path,
    validation: Sequence[LabeledImage],
    model_params: ImageInput,
    params: Params,
) -> dict[str, Any]:
    """Parameters, file size and validation metrics of one model."""
    scores = predict_probabilities(model, validation, model_params, params.evaluate.batch_size)
    metrics = classification_metrics(labels_of(validation), scores, params.evaluate.threshold)
    return {
        "parameters": int(model.count_params()),
        "file_bytes": file_path.stat().st_size,
        "validation_accuracy": metrics["accuracy"],
        "escape_rate": metrics["escape_rate"],
        "overkill_rate": metrics["overkill_rate"],
    }


def _save_atomic(
    model: keras.Model, out_path: Path, mapping: dict[str, int], model_params: ImageInput,
    training: dict[str, Any],
) -> None:
    """Write to a temp .h5 beside ``out_path``, then rename: the old candidate stays whole until then."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(out_path, suffix=".h5") as temp:
        save_model(model, temp, mapping, model_params, training=training)


def run_prune(
    params: Params,
    model_path: Path | str | None = None,
    out_path: Path | str | None = None,
    reports_dir: Path | str | None = None,
    *,
    fraction: float | None = None,
    epochs: int | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Prune ``model_path``, fine-tune, write the pruned candidate and reports/prune.json.

    ``fraction`` and ``epochs`` default to ``prune.fraction`` and ``prune.fine_tune_epochs``.
    """
    candidate, reports_dir = params.paths.candidate, Path(reports_dir or params.paths.reports)
    model_path, out_path = Path(model_path or candidate), Path(out_path or candidate)
    fraction = params.prune.fraction if fraction is None else fraction
    epochs = params.prune.fine_tune_epochs if epochs is None else epochs
    if not 0 <= fraction < 1 or epochs < 0:
        raise PruneError(f"--fraction must be >= 0 and < 1 (got {fraction}), --epochs >= 0 (got {epochs})")
    metadata = read_model_metadata(model_path)
    if metadata["class_mapping"] != params.data.class_mapping:
        raise PruneError(
            f"{model_path}: trained with class mapping {metadata['class_mapping']} but data.classes "
            f"gives {params.data.class_mapping}; prune a model trained on this data set"
        )
    model_params = model_params_from_file(model_path)
    images = read_images(reports_dir, params.data, params.paths.reports)
    train_images, validation = select(images, "train"), select(images, "validation")
    require_split(train_images, "train", params.data.dir)
    require_split(validation, "validation", params.data.dir)
    model = load_model(model_path)
    before = measure(model, model_path, validation, model_params, params)
    source_sha256 = sha256_of(model_path)
    pruned, layers = prune_model(model, fraction)
    report("pruned " + ", ".join(f"{row['layer']} {row['filters_before']}->{row['filters_after']}" for row in layers))
    not_tuned = classification_metrics(
        labels_of(validation),
        predict_probabilities(pruned, validation, model_params, params.evaluate.batch_size),
        params.evaluate.threshold,
    )["accuracy"]
    history = fine_tune(pruned, train_images, validation, model_params, params=params, epochs=epochs, report=report)
    training = {
        "first_layer_init": None,  # unknown for a source saved before training records existed
        **metadata["training"],
        "pruned": {
            "fraction": fraction, "criterion": CRITERION, "fine_tune_epochs": epochs,
            "source": str(model_path), "source_sha256": source_sha256,
            "filters": {row["layer"]: [row["filters_before"], row["filters_after"]] for row in layers},
        },
    }
    _save_atomic(pruned, out_path, metadata["class_mapping"], model_params, training)
    after = measure(pruned, out_path, validation, model_params, params)
    speed = speed_batch(validation, model_params, params.prune.speed_images)
    before["images_per_second"], after["images_per_second"] = images_per_second(
        [model, pruned], speed, params.evaluate.batch_size
    )
    result = {
        "source": str(model_path), "source_sha256": source_sha256, "out": str(out_path),
        "fraction": fraction, "criterion": CRITERION, "fine_tune_epochs": epochs,
        "validation_images": len(validation), "speed_images": len(speed),
        "layers": layers,
        "before": before,
        "pruned_not_fine_tuned": {"validation_accuracy": not_tuned},
        "after": after,
        "fine_tune_history": history,
    }
    write_json(reports_dir / "prune.json", result)
    report(f"wrote {out_path}: {after['parameters']} parameters (was {before['parameters']}), "
           f"validation accuracy {after['validation_accuracy']:.4f} (was {before['validation_accuracy']:.4f})")
    return result
