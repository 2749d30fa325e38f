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
import html
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tasks.dataset import UNTYPED, LabeledImage, decode_image, defect_types_of, list_images, require_split, select
from tasks.errors import FanaoiError
from tasks.evaluate import classification_metrics, escape_bounds, predict_probabilities, roc_points
from tasks.model import ModelFileError, load_model, model_params_from_file, read_model_metadata
from tasks.params import ImageInput, Params
from tasks.registry import HISTORY_FILE, published_version, read_embedded_card
from tasks.train import read_history

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# A 3x3 kernel or a 37x37 feature map is too small to see; cells are scaled up to about
# this many pixels with nearest neighbour, so each weight stays one visible square.
FILTER_CELL_PIXELS = 36
FEATURE_CELL_PIXELS = 64
GRID_GAP = 2
GRID_BACKGROUND = 255
HEATMAP_ALPHA = 0.45
GRAD_CAM_BATCH = 32


class ExplainError(FanaoiError):
    """The model or image cannot be explained; the message names the file and the fix."""


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
class Grid:
    """Cells laid out row by row, ``cell`` pixels each, ``GRID_GAP`` pixels apart."""

    image: np.ndarray
    cells: int
    columns: int
    cell: tuple[int, int]

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of cell ``index``."""
        row, column = divmod(index, self.columns)
        top, left = row * (self.cell[0] + GRID_GAP), column * (self.cell[1] + GRID_GAP)
        return top, left, top + self.cell[0], left + self.cell[1]


# --- which model ---------------------------------------------------------------------


def resolve_source(
    params: Params, version: str | None, model_path: str | Path | None, reports_dir: Path | str
) -> ModelSource:
    """A registry version (default: the champion's) or a model file, with its threshold."""
    if version is not None and model_path is not None:
        raise ExplainError("give a VERSION or --model PATH, not both")
    if model_path is not None:
        return _file_source(Path(model_path), params, Path(reports_dir) / "history.csv")
    registry = Path(params.registry.dir)
    name, folder = published_version(registry, version, error=ExplainError, hint="(or pass --model PATH)")
    card = read_embedded_card(folder / "model.h5")
    history = folder / HISTORY_FILE
    return ModelSource(
        name=name, path=folder / "model.h5", threshold=float(card["threshold"]),
        threshold_origin=f"the model card of {name}",
        history=history if history.is_file() else None,
        history_note=f"from {history}" if history.is_file() else (
            f"{folder} holds no training history (it was published without one); "
            f"the curves of the latest training run are in reports/history.csv"
        ),
    )


def _file_source(path: Path, params: Params, history: Path) -> ModelSource:
    try:
        card = read_embedded_card(path)
        threshold, origin = float(card["threshold"]), f"the model card inside {path}"
    except ModelFileError:
        # A candidate has no card yet: it would be gated at the evaluate threshold.
        threshold, origin = params.evaluate.threshold, "evaluate.threshold in params.yaml"
    return ModelSource(
        name=path.stem, path=path, threshold=threshold, threshold_origin=origin,
        history=history if history.is_file() else None,
        history_note=f"from {history}" if history.is_file() else f"{history} not found",
    )


# --- pictures of the network ---------------------------------------------------------


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not layers:
        raise ExplainError(f"model {model.name!r} has no Conv2D layer; explain needs a CNN")
    return layers


def normalise_kernel(kernel: np.ndarray) -> np.ndarray:
    """One kernel (height, width, channels) min-max scaled to 0..255 uint8."""
    low, high = float(kernel.min()), float(kernel.max())
    scaled = (kernel - low) / (high - low) if high > low else np.zeros_like(kernel)
    return np.round(scaled * 255).astype(np.uint8)


def _upscale(cell: np.ndarray, target: int) -> np.ndarray:
    factor = max(1, math.ceil(target / cell.shape[0]))
    return np.repeat(np.repeat(cell, factor, axis=0), factor, axis=1)


def _as_rgb(cell: np.ndarray) -> np.ndarray:
    if cell.ndim == 2:
        cell = cell[..., None]
    return np.repeat(cell, 3, axis=2) if cell.shape[2] == 1 else cell


def tile(cells: Sequence[np.ndarray]) -> Grid:
    """Equal-sized RGB cells in a near-square grid on a white background."""
    columns = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / columns)
    height, width = cells[0].shape[:2]
    image = np.full(
        (rows * (height + GRID_GAP) - GRID_GAP, columns * (width + GRID_GAP) - GRID_GAP, 3),
        GRID_BACKGROUND, dtype=np.uint8,
    )
    grid = Grid(image, len(cells), columns, (height, width))
    for index, cell in enumerate(cells):
        top, left, bottom, right = grid.box(index)
        image[top:bottom, left:right] = cell
    return grid


def filter_grid(model: keras.Model) -> Grid:
    """The first Conv2D's kernels, each normalised on its own and enlarged."""
    layer = conv_layers(model)[0]
    kernels = layer.get_weights()[0]  # (height, width, input channels, filters)
    if kernels.shape[2] not in (1, 3):
        raise ExplainError(
            f"first Conv2D {layer.name!r} reads {kernels.shape[2]} channels; only grayscale "
            f"or RGB input can be drawn"
        )
    cells = [
        _upscale(_as_rgb(normalise_kernel(kernels[..., k])), FILTER_CELL_PIXELS)
        for k in range(kernels.shape[3])
    ]
    return tile(cells)


def _forward(
    model: keras.Model, images: Any, tape: Any = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Run the layers one by one: each Conv2D's output and the model's output.

    A Sequential loaded from .h5 was rebuilt layer by layer, so ``layer.output`` belongs
    to a graph that never reaches the final output; calling the layers in order avoids
    that. With a tape, each Conv2D output is watched, so gradients can be taken toward it.
    """
    import keras

    if not isinstance(model, keras.Sequential):
        raise ExplainError(
            f"model {model.name!r} is a {type(model).__name__}; explain reads FanAOI's "
            f"Sequential models (tasks.model.build_model)"
        )
    convs, tensor = [], images
    for layer in model.layers:
        tensor = layer(tensor, training=False)
        if isinstance(layer, keras.layers.Conv2D):
            if tape is not None:
                tape.watch(tensor)
            convs.append((layer.name, tensor))
    return convs, tensor


def feature_maps(model: keras.Model, image: np.ndarray) -> tuple[list[tuple[str, np.ndarray]], float]:
    """Each Conv2D's activations (height, width, filters) for one image, and the model output."""
    conv_layers(model)
    convs, output = _forward(model, image[None])
    return [(name, np.asarray(v)[0]) for name, v in convs], float(np.asarray(output).reshape(-1)[0])


def feature_grid(activations: np.ndarray) -> Grid:
    """One grayscale cell per filter, each scaled to its own range (a dead filter is black)."""
    cells = []
    for k in range(activations.shape[2]):
        channel = activations[..., k]
        low, high = float(channel.min()), float(channel.max())
        scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        cells.append(_upscale(_as_rgb(np.round(scaled * 255).astype(np.uint8)), FEATURE_CELL_PIXELS))
    return tile(cells)


def grad_cam(
    model: keras.Model, images: np.ndarray, targets: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of the last Conv2D toward a class per image (label 1 or 0).

    ``images`` is a preprocessed batch (n, height, width, channels). The model outputs the
    positive-class probability p, so the score of label 1 is p and of label 0 is 1 - p.
    Returns maps (n, height, width) in [0, 1] (all zero when nothing in the image raises
    the score) and p.
    """
    import tensorflow as tf

    conv_layers(model)
    maps, probabilities = [], []
    for start in range(0, len(images), GRAD_CAM_BATCH):
        batch = tf.convert_to_tensor(images[start : start + GRAD_CAM_BATCH], dtype=tf.float32)
        toward_positive = tf.convert_to_tensor(np.asarray(targets[start : start + GRAD_CAM_BATCH]) == 1)
        with tf.GradientTape() as tape:
            convs, probability = _forward(model, batch, tape)
            activations = convs[-1][1]
            probability = tf.reshape(probability, [-1])
            target = tf.where(toward_positive, probability, 1.0 - probability)
            # Images in a batch do not interact: the gradient of the sum is each one's own.
            total = tf.reduce_sum(target)
        gradients = tape.gradient(total, activations)
        weights = tf.reduce_mean(gradients, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", activations, weights))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
        maps.append(np.clip(cam.numpy(), 0.0, 1.0))
        probabilities.append(probability.numpy())
    return np.concatenate(maps), np.concatenate(probabilities)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """Blue (0) -> cyan -> green -> yellow -> red (1), as uint8 RGB."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 200, 80], [255, 230, 0], [220, 0, 0]], float)
    position = np.clip(heat, 0, 1) * (len(stops) - 1)
    lower = np.minimum(position.astype(int), len(stops) - 2)
    fraction = (position - lower)[..., None]
    return np.round(stops[lower] * (1 - fraction) + stops[lower + 1] * fraction).astype(np.uint8)


def overlay(original: Image.Image, heats: Sequence[np.ndarray]) -> Image.Image:
    """The image, then one copy per heatmap with it blended over, side by side at the image's size."""
    base = original.convert("RGB")
    panels = [base]
    for heat in heats:
        resized = Image.fromarray(np.round(heat * 255).astype(np.uint8), "L").resize(
            base.size, Image.Resampling.BILINEAR
        )
        colours = Image.fromarray(heat_colours(np.asarray(resized) / 255.0), "RGB")
        panels.append(Image.blend(base, colours, HEATMAP_ALPHA))
    strip = Image.new("RGB", (len(panels) * (base.width + GRID_GAP) - GRID_GAP, base.height), "white")
    for index, panel in enumerate(panels):
        strip.paste(panel, (index * (base.width + GRID_GAP), 0))
    return strip


# --- which images the model got wrong ------------------------------------------------


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


# --- charts (inline SVG) --------------------------------------------------------------

_SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
_CHART = {"width": 420, "height": 280, "left": 52, "right": 16, "top": 28, "bottom": 42}


def _ticks(low: float, high: float, whole: bool = False, count: int = 5) -> list[float]:
    """Evenly spaced tick values; whole numbers only (epochs) when ``whole``."""
    if whole:
        step = max(1, math.ceil((high - low) / 10))
        return list(range(math.ceil(low), math.floor(high) + 1, step))
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def svg_line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    *,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    diagonal: bool = False,
) -> str:
    """A small line chart: ``series`` are (name, xs, ys); ranges default to the data's."""
    c = _CHART
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    x0, x1 = x_range or (min(xs), max(xs))
    y0, y1 = y_range or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    plot_w, plot_h = c["width"] - c["left"] - c["right"], c["height"] - c["top"] - c["bottom"]

    def px(x: float) -> float:
        return c["left"] + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return c["top"] + (1 - (y - y0) / (y1 - y0)) * plot_h

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{c["width"]}" height="{c["height"]}" '
        f'role="img" aria-label="{e(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{c["width"] / 2}" y="16" text-anchor="middle" font-size="13">{e(title)}</text>',
        f'<rect x="{c["left"]}" y="{c["top"]}" width="{plot_w}" height="{plot_h}" '
        f'fill="none" stroke="#999"/>',
    ]
    for x in _ticks(x0, x1, whole=all(float(x).is_integer() for x in xs)):
        parts.append(f'<text x="{px(x):.1f}" y="{c["top"] + plot_h + 14}" '
                     f'text-anchor="middle">{x:.3g}</text>')
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{c["left"]}" x2="{c["left"] + plot_w}" y1="{py(y):.1f}" '
                     f'y2="{py(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{c["left"] - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    parts += [
        f'<text x="{c["left"] + plot_w / 2}" y="{c["height"] - 8}" text-anchor="middle">{e(x_label)}</text>',
        f'<text transform="translate(12 {c["top"] + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{e(y_label)}</text>',
    ]
    if diagonal:
        parts.append(f'<line x1="{px(x0):.1f}" y1="{py(y0):.1f}" x2="{px(x1):.1f}" y2="{py(y1):.1f}" '
                     f'stroke="#bbb" stroke-dasharray="4 3"/>')
    for index, (name, sx, sy) in enumerate(series):
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        # Right middle: rising curves (accuracy, ROC) end high there, falling ones (loss) low.
        legend_x, legend_y = c["left"] + plot_w - 110, c["top"] + plot_h / 2 + 14 * index
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y - 4}" '
                     f'y2="{legend_y - 4}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{legend_x + 22}" y="{legend_y}">{e(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def history_columns(path: Path) -> dict[str, list[float]]:
    """history.csv as columns of floats."""
    rows = read_history(path)
    return {column: [row[column] for row in rows] for column in rows[0]} if rows else {}


def history_charts(history: dict[str, list[float]]) -> list[str]:
    epochs = history.get("epoch", [])
    charts = []
    for measure in ("accuracy", "loss"):
        series = [
            (name, epochs, history[column])
            for name, column in (("train", measure), ("validation", f"val_{measure}"))
            if column in history
        ]
        if series and epochs:
            charts.append(svg_line_chart(f"{measure.capitalize()} per epoch", series, "epoch", measure))
    return charts


# --- the report -----------------------------------------------------------------------


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
    *,
    version: str | None = None,
    model_path: str | Path | None = None,
    image_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    reports_dir: str | Path | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Write ``index.html`` and its PNGs for a model; returns what was drawn and where."""
    started = time.perf_counter()
    reports_dir = Path(reports_dir or params.paths.reports)
    source = resolve_source(params, version, model_path, reports_dir)
    out = Path(out_dir) if out_dir else Path(reports_dir) / "explain" / source.name
    metadata = read_model_metadata(source.path)
    mapping = metadata["class_mapping"]
    class_names = tuple(sorted(mapping, key=mapping.get))
    model_params = model_params_from_file(source.path)
    model = load_model(source.path)

    validation = select(list_images(params.data.dir, params.data), "validation")
    require_split(validation, "validation", params.data.dir)
    validation = _relabel(validation, mapping, source.path)
    labels = np.asarray([image.label for image in validation])
    probabilities = predict_probabilities(model, validation, model_params, params.registry.predict_batch_size)
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
    page = render_html(summary, class_names, roc_points(labels, probabilities), history)
    (out / "index.html").write_text(page, encoding="utf-8")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    report(
        f"{source.name}: {len(summary['escapes'])} escape(s), {len(summary['overkills'])} "
        f"overkill(s) on {len(validation)} validation images, {len(heatmaps)} heatmap(s) -> "
        f"{summary['index']} ({summary['seconds']:.1f}s)"
    )
    return summary


def _confusion_table(confusion: dict[str, int], class_names: Sequence[str]) -> str:
    negative, positive = (html.escape(n) for n in class_names)
    kinds = {"tn": "correct", "tp": "correct", "fp": "overkill", "fn": "escape"}

    def cell(key: str) -> str:
        return f'<td class="{kinds[key]}">{confusion[key]}<br><small>{kinds[key]}</small></td>'

    return (
        f"<table class=confusion><tr><th>actual \\ predicted</th><th>{negative}</th>"
        f"<th>{positive}</th></tr>"
        f"<tr><th>{negative}</th>{cell('tn')}{cell('fp')}</tr>"
        f"<tr><th>{positive}</th>{cell('fn')}{cell('tp')}</tr></table>"
    )


def _upper_text(metrics: dict[str, Any]) -> str:
    upper = metrics.get("escape_rate_upper95")
    return "" if upper is None else f" (95 % upper bound {upper:.4f})"


def _defect_type_table(metrics: dict[str, Any], positive: str) -> str:
    """Escapes per defect type (subfolder of the positive class) with their upper bounds."""
    per_type = metrics.get("defect_types") or {}
    if not per_type:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(kind)}</td><td>{row['count']}</td><td>{row['escapes']}</td>"
        f"<td>{row['escape_rate']:.4f}</td><td>{row['escape_rate_upper95']:.4f}</td></tr>"
        for kind, row in per_type.items()
    )
    return (
        f"<h3>Escapes per defect type</h3><p>Defect type = subfolder of {e(positive)}/ "
        f"(images directly in it: {e(UNTYPED)}). The upper bound is the top of the exact "
        f"(Clopper-Pearson) 95 % interval: with few images a rate of 0 is not a guarantee.</p>"
        f"<table><tr><th>defect type</th><th>{e(positive)} images</th><th>escapes</th>"
        f"<th>escape rate</th><th>95 % upper bound</th></tr>{rows}</table>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
table.confusion td { text-align: center; min-width: 6em; }
td.correct { background: #e6f4e6; } td.escape { background: #f8d0d0; }
td.overkill { background: #fbe8c8; }
img.pixels { image-rendering: pixelated; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 390px; word-break: break-all; }
.charts svg { margin-right: 1em; }
"""


def render_html(
    summary: dict[str, Any],
    class_names: Sequence[str],
    roc: Sequence[dict[str, float]],
    history: dict[str, list[float]],
) -> str:
    """The whole page; every piece of text from files or params is escaped."""
    e = html.escape
    metrics = summary["validation"]
    negative, positive = class_names
    auc = metrics["auc"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>FanAOI explain: {e(summary['model'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Inside model {e(summary['model'])}</h1>",
        "<table>",
        *(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in (
            ("model file", summary["model_path"]),
            ("classes", ", ".join(f"{n}={label}" for n, label in summary["class_mapping"].items())),
            ("input", f"{summary['input']['input_size'][0]}x{summary['input']['input_size'][1]} "
                      f"{summary['input']['color_mode']}, {summary['input']['scale']}"),
            ("threshold", f"{summary['threshold']:.4f}: p({positive}) >= threshold -> {positive} "
                          f"(from {summary['threshold_origin']})"),
        )),
        "</table>",
        "<h2>Validation</h2>",
        f"<p>{metrics['count']} validation images: accuracy {metrics['accuracy']:.4f}, escape rate "
        f"{metrics['escape_rate']:.4f}{_upper_text(metrics)} ({e(positive)} passed as {e(negative)}), overkill rate "
        f"{metrics['overkill_rate']:.4f} ({e(negative)} rejected), AUC "
        f"{'n/a' if auc is None else f'{auc:.4f}'}.</p>",
        _confusion_table(metrics["confusion"], class_names),
        _defect_type_table(metrics, positive),
        '<div class="charts">',
        svg_line_chart(
            "ROC (validation)",
            [(f"AUC {'n/a' if auc is None else f'{auc:.4f}'}", [p["fpr"] for p in roc], [p["tpr"] for p in roc])],
            "false positive rate (overkill)", "true positive rate",
            x_range=(0, 1), y_range=(0, 1), diagonal=True,
        ),
        "</div>",
        "<h2>Training curves</h2>",
    ]
    charts = history_charts(history)
    parts.append(f"<p>{e(summary['history_note'])}.</p>" if not charts else
                 f"<p>{e(summary['history_note'])} (also <code>dvc plots show</code>).</p>")
    parts += ['<div class="charts">', *charts, "</div>"]

    filters = summary["filters"]
    parts += [
        f"<h2>First-layer filters ({filters['count']}, layer {e(filters['layer'])})</h2>",
        "<p>Each kernel scaled to its own min..max (black..white), enlarged with nearest "
        "neighbour: one square per weight.</p>",
        f'<img class="pixels" src="{e(filters["png"])}" alt="first-layer filters">',
    ]

    probe = summary["probe"]
    parts += [
        "<h2>Feature maps</h2>",
        f"<p>For {e(probe['path'])}: p({e(positive)}) = {probe['probability']:.4f}, predicted "
        f"{e(probe['predicted'])}. Each cell is one filter's output scaled to its own range; "
        f"a black cell is a filter silent on this image.</p>",
    ]
    for layer in summary["feature_maps"]:
        height, width, count = layer["shape"]
        parts += [
            f"<h3>{e(layer['layer'])}: {count} maps of {height}x{width}, {layer['silent']} silent</h3>",
            f'<img class="pixels" src="{e(layer["png"])}" alt="feature maps of {e(layer["layer"])}">',
        ]

    heatmaps = summary["heatmaps"]
    escapes, overkills = len(summary["escapes"]), len(summary["overkills"])
    parts += [
        "<h2>Grad-CAM on the mistakes</h2>",
        f"<p>{escapes} escape(s) ({e(positive)} predicted {e(negative)}) and {overkills} "
        f"overkill(s) ({e(negative)} predicted {e(positive)}); escapes first, the most confident "
        f"mistake first. Each picture: the image, then Grad-CAM of the last Conv2D toward the "
        f"predicted class, then toward the actual class (red = most weight). A blank map means "
        f"nothing in the image raised that class's score.</p>",
    ]
    if summary["left_out"]:
        parts.append(
            f"<p><strong>{summary['left_out']} mistake(s) left out</strong>: only the first "
            f"{summary['max_heatmaps']} are drawn (explain.max_heatmaps in params.yaml).</p>"
        )
    if not heatmaps:
        parts.append("<p>No mistakes on the validation images.</p>")
    for kind in ("escape", "overkill"):
        shown = [h for h in heatmaps if h["kind"] == kind]
        if shown:
            parts.append(f"<h3>{kind.capitalize()}s ({len(shown)} shown)</h3><div>")
            parts += [
                f'<figure><img src="{e(h["png"])}" width="390" alt="{e(kind)}">'
                f"<figcaption>{e(h['path'])}<br>p({e(positive)}) = {h['probability']:.4f}"
                + "".join(f"; {which} map blank" for which, blank in zip(
                    ("predicted", "actual"), h["blank"], strict=True) if blank)
                + "</figcaption></figure>"
                for h in shown
            ]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

