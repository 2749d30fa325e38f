"""Pictures of a network: its first-layer filters, each layer's feature maps, Grad-CAM heatmaps.

Arrays in, arrays and Pillow images out; the explain page (tasks.model.explain) saves and
lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tasks.errors import FanaoiError

if TYPE_CHECKING:
    import keras


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
            f"Sequential models (tasks.model.network.build_model)"
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
