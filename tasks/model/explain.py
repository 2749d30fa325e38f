"""Look inside a model: its filters, what each layer sees, and where it looks when it is wrong.

``run_explain`` writes one HTML page with PNGs beside it for a registry version or a
model file: the first Conv2D's kernels, the feature maps of every Conv2D for one image,
a Grad-CAM heatmap over each validation image the model got wrong (escapes first, the
costly error, then overkills), the confusion matrix and ROC curve, and the training
curves. The model is scored with its own class mapping, preprocessing and threshold, so
the mistakes shown are the ones it makes in production.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tasks.data.dataset import UNTYPED, LabeledImage, decode_image, defect_types_of, require_split
from tasks.data.image_manifest import read_split
from tasks.durable import atomic_write
from tasks.inference.metrics import classification_metrics, escape_bounds, roc_points
from tasks.inference.model_file import load_model, model_params_from_file, read_model_metadata
from tasks.inference.predictor import predict_probabilities
from tasks.model.charts import history_charts, history_columns, line_chart
from tasks.model.explain_pictures import (
    ExplainError,
    conv_layers,
    feature_grid,
    feature_maps,
    filter_grid,
    grad_cam,
    overlay,
)
from tasks.pages import render_page
from tasks.params import ImageInput, Params

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Which model to explain, the threshold it is used with, and where its history is."""

    name: str
    path: Path
    threshold: float
    threshold_origin: str
    history: Path | None
    history_note: str



@dataclass(frozen=True)
class Mistake:
    image: LabeledImage
    kind: str  # "escape" (positive class passed) or "overkill" (negative class rejected)
    probability: float



def mistakes(
    images: Sequence[LabeledImage], labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> list[Mistake]:
    """Escapes first, then overkills; within each, the most confident mistake first."""
    predicted = probabilities >= threshold
    escapes = [
        Mistake(images[i], "escape", float(probabilities[i]))
        for i in np.argsort(probabilities, kind="stable") if labels[i] == 1 and not predicted[i]
    ]
    overkills = [
        Mistake(images[i], "overkill", float(probabilities[i]))
        for i in np.argsort(-probabilities, kind="stable") if labels[i] == 0 and predicted[i]
    ]
    return escapes + overkills



def decode_file(path: Path, model_params: ImageInput) -> np.ndarray:
    """One image file preprocessed as the model expects; an unreadable file names itself."""
    import tensorflow as tf

    try:
        return decode_image(tf.io.read_file(str(path)), model_params).numpy()
    except (tf.errors.OpError, ValueError) as exc:
        raise ExplainError(
            f"{path}: cannot be read as an image ({type(exc).__name__}); pass a PNG, JPEG or BMP"
        ) from None



def _clear_pngs(folder: Path) -> None:
    """Pictures of an earlier run (it may have had more mistakes) must not linger."""
    if folder.is_dir():
        for old in folder.glob("*.png"):
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)



def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)



def _save(array_or_image: np.ndarray | Image.Image, path: Path) -> str:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path)
    return path.name



def _relabel(images: Sequence[LabeledImage], mapping: dict[str, int], path: Path) -> list[LabeledImage]:
    """Labels by the model's own class mapping, which may predate params.yaml's."""
    missing = sorted({image.class_name for image in images} - set(mapping))
    if missing:
        raise ExplainError(
            f"{path}: the model knows the classes {sorted(mapping)} but the data has "
            f"{', '.join(missing)}; explain it on the data it was trained for"
        )
    return [dataclasses.replace(image, label=mapping[image.class_name]) for image in images]



def draw_feature_maps(
    model: keras.Model, image: np.ndarray, folder: Path
) -> tuple[list[dict[str, Any]], float]:
    """A grid PNG per Conv2D for one preprocessed image; returns their entries and p."""
    _clear_pngs(folder)
    maps, probability = feature_maps(model, image)
    entries = []
    for name, activations in maps:
        png = _save(feature_grid(activations).image, folder / f"{_file_name(name)}.png")
        silent = sum(1 for k in range(activations.shape[2]) if not activations[..., k].any())
        entries.append({
            "layer": name, "png": f"{folder.name}/{png}", "shape": list(activations.shape),
            "silent": silent,
        })
    return entries, probability



def draw_heatmaps(
    model: keras.Model, shown: Sequence[Mistake], model_params: ImageInput, folder: Path
) -> list[dict[str, Any]]:
    """One PNG per mistake: the image, Grad-CAM toward the predicted and the actual class."""
    _clear_pngs(folder)
    if not shown:
        return []
    batch = np.stack([decode_file(m.image.path, model_params) for m in shown])
    actual = np.array([m.image.label for m in shown])
    # Toward the predicted class (what made the mistake) and the actual one (what it
    # missed): a model that reads one class as "no evidence of the other" leaves the
    # first map blank, and the second shows where it saw too little.
    predicted_maps, _ = grad_cam(model, batch, 1 - actual)
    actual_maps, _ = grad_cam(model, batch, actual)
    entries = []
    for number, (mistake, *maps) in enumerate(zip(shown, predicted_maps, actual_maps, strict=True), 1):
        with Image.open(mistake.image.path) as original:
            png = _save(overlay(original, maps), folder / f"{number:03d}-{mistake.kind}.png")
        entries.append({
            "kind": mistake.kind, "path": str(mistake.image.path),
            "probability": mistake.probability, "png": f"{folder.name}/{png}",
            "blank": [not m.any() for m in maps],
        })
    return entries



def run_explain(
    params: Params,
    source: ModelSource,
    *,
    image_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    reports_dir: str | Path | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Write ``index.html`` and its PNGs for ``source``'s model; returns what was drawn and where."""
    started = time.perf_counter()
    reports_dir = Path(reports_dir or params.paths.reports)
    out = Path(out_dir) if out_dir else Path(reports_dir) / "explain" / source.name
    metadata = read_model_metadata(source.path)
    mapping = metadata["class_mapping"]
    class_names = tuple(sorted(mapping, key=mapping.get))
    model_params = model_params_from_file(source.path)
    model = load_model(source.path)

    validation = read_split(reports_dir, params.data, "validation", params.paths.reports)
    require_split(validation, "validation", params.data.dir)
    validation = _relabel(validation, mapping, source.path)
    labels = np.asarray([image.label for image in validation])
    probabilities = predict_probabilities(model, validation, model_params, params.evaluate.batch_size)
    metrics = classification_metrics(labels, probabilities, source.threshold)
    metrics |= escape_bounds(labels, probabilities, source.threshold, defect_types_of(validation))
    wrong = mistakes(validation, labels, probabilities, source.threshold)
    shown = wrong[: params.explain.max_heatmaps]

    out.mkdir(parents=True, exist_ok=True)
    filters = filter_grid(model)
    filters_png = _save(filters.image, out / "filters.png")

    probe_path = Path(image_path) if image_path else validation[0].path
    feature_pngs, probe_probability = draw_feature_maps(
        model, decode_file(probe_path, model_params), out / "feature_maps"
    )
    heatmaps = draw_heatmaps(model, shown, model_params, out / "heatmaps")

    history = history_columns(source.history) if source.history else {}
    summary = {
        "model": source.name,
        "model_path": str(source.path),
        "threshold": source.threshold,
        "threshold_origin": source.threshold_origin,
        "class_mapping": mapping,
        "input": metadata["preprocessing"],
        "validation": metrics,
        "escapes": [str(m.image.path) for m in wrong if m.kind == "escape"],
        "overkills": [str(m.image.path) for m in wrong if m.kind == "overkill"],
        "heatmaps": heatmaps,
        "left_out": len(wrong) - len(shown),
        "max_heatmaps": params.explain.max_heatmaps,
        "filters": {"png": filters_png, "count": filters.cells, "layer": conv_layers(model)[0].name},
        "feature_maps": feature_pngs,
        "probe": {
            "path": str(probe_path), "probability": probe_probability,
            "predicted": class_names[int(probe_probability >= source.threshold)],
        },
        "history_note": source.history_note,
        "index": str(out / "index.html"),
    }
    page = render_html(summary, class_names, roc_points(labels, probabilities), history).encode("utf-8")
    atomic_write(out / "index.html", lambda handle: handle.write(page))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    report(
        f"{source.name}: {len(summary['escapes'])} escape(s), {len(summary['overkills'])} "
        f"overkill(s) on {len(validation)} validation images, {len(heatmaps)} heatmap(s) -> "
        f"{summary['index']} ({summary['seconds']:.1f}s)"
    )
    return summary


def render_html(
    summary: dict[str, Any],
    class_names: Sequence[str],
    roc: Sequence[dict[str, float]],
    history: dict[str, list[float]],
) -> str:
    """The whole page; every piece of text from files or params is escaped by the template."""
    auc = summary["validation"]["auc"]
    roc_chart = line_chart(
        "ROC (validation)",
        [(f"AUC {'n/a' if auc is None else f'{auc:.4f}'}", [p["fpr"] for p in roc], [p["tpr"] for p in roc])],
        "false positive rate (overkill)", "true positive rate",
        x_range=(0, 1), y_range=(0, 1), diagonal=True,
    )
    negative, positive = class_names
    return render_page(
        "explain.html.j2", s=summary, negative=negative, positive=positive, untyped=UNTYPED,
        upper95=summary["validation"].get("escape_rate_upper95"),
        roc_chart=roc_chart, history_charts=history_charts(history),
    )
