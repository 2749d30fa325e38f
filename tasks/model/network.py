"""Build and save the Keras GO/NG classifier (reading a model file is tasks.inference.model_file's job).

The class mapping and preprocessing travel inside the .h5 file (HDF5 attributes), so a
model file on its own is enough to predict correctly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.inference.model_file import MAPPING_ATTR, PREPROCESSING_ATTR, TRAINING_ATTR, preprocessing_of
from tasks.params import ImageInput, ModelParams

if TYPE_CHECKING:
    import keras
    import numpy as np


def build_model(
    params: ModelParams, learning_rate: float, jit_compile: bool = False, steps_per_execution: int = 1
) -> keras.Model:
    """The classifier that ``model.architecture`` names, compiled for binary classification.

    Layers and optimizer are named here: Keras numbers unnamed ones per process
    (``conv2d_7``, ``adam_3``), so a model trained in a long-lived process (a Prefect
    worker, the test session) would differ in bytes from the same model trained by
    ``dvc repro``, and DVC would see a changed candidate.
    """
    import keras

    builders = {"seed_cnn": _seed_layers, "small_cnn": _seed_layers, "aoi_cnn": _aoi_layers}
    height, width = params.input_size
    model = keras.Sequential(name=params.architecture)
    model.add(keras.Input(shape=(height, width, params.channels), name="image"))
    if params.standardize:
        for layer in standardize_layers((height, width, params.channels)):
            model.add(layer)
    for layer in builders[params.architecture](params):
        model.add(layer)
    fuse_batch_norm(model)
    if params.first_layer_init == "edges":
        place_edge_kernels(model.get_layer("conv1"))  # the name every architecture gives its first Conv2D
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, name="adam"),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def standardize_layers(shape: tuple[int, int, int]) -> list[keras.layers.Layer]:
    """Each image to zero mean and unit variance over its pixels and channels.

    Keras' own LayerNormalization without a learned scale or shift, over the image
    flattened and reshaped back: no weights, and the saved .h5, the exports and the service
    load it with no custom object. (Normalizing over axes [1, 2, 3] directly does not
    survive the .h5: Keras 3's legacy loader drops an axis list of more than one entry and
    the loaded layer normalizes over the last axis only.) Its epsilon (1e-3) keeps a flat
    image's noise from being blown up to full contrast.
    """
    from keras import layers

    return [
        layers.Reshape((-1,), name="standardize_flatten"),
        layers.LayerNormalization(axis=-1, center=False, scale=False, name="standardize"),
        layers.Reshape(shape, name="standardize_unflatten"),
    ]


def _first_initializer(params: ModelParams, index: int) -> str:
    # `edges` starts from glorot and overwrites kernels afterwards; he_normal is a built-in
    # name, so the saved .h5 loads without custom objects either way.
    return "he_normal" if index == 0 and params.first_layer_init == "he_normal" else "glorot_uniform"


def _seed_layers(params: ModelParams) -> list[keras.layers.Layer]:
    """The seed's CNN: Conv-Pool blocks, Flatten, Dense, sigmoid (small_cnn: one block)."""
    from keras import layers

    filters = params.conv_filters if params.architecture == "seed_cnn" else params.conv_filters[:1]
    stack: list[keras.layers.Layer] = []
    for index, count in enumerate(filters):
        stack.append(layers.Conv2D(count, (3, 3), activation="relu",
                                   kernel_initializer=_first_initializer(params, index), name=f"conv{index + 1}"))
        stack.append(layers.MaxPooling2D((2, 2), name=f"pool{index + 1}"))
    stack.append(layers.Flatten(name="flatten"))
    stack.append(layers.Dense(params.dense_units, activation="relu", name="dense"))
    if params.dropout > 0:
        stack.append(layers.Dropout(params.dropout, name="dropout"))
    stack.append(layers.Dense(1, activation="sigmoid", name="output"))
    return stack


def _aoi_layers(params: ModelParams) -> list[keras.layers.Layer]:
    """Conv-BatchNorm-ReLU blocks, global average (or max) pooling, dropout, sigmoid.

    One block per ``conv_filters`` entry with ``convs_per_block`` convolutions; the first
    convolution strides by ``stem_stride`` and every block but the last ends in a 2x2 max
    pool. Global pooling keeps the parameter count independent of the input size, so a
    larger input (small defects stay visible) costs compute, not weights.
    """
    from keras import layers

    stack: list[keras.layers.Layer] = []
    index = 0
    for block, count in enumerate(params.conv_filters):
        for _ in range(params.convs_per_block):
            stride = params.stem_stride if index == 0 else 1
            stack += [
                layers.Conv2D(count, (3, 3), strides=stride, padding="same", use_bias=False,
                              kernel_initializer=_first_initializer(params, index), name=f"conv{index + 1}"),
                # momentum 0.9, not Keras' 0.99: with a few dozen steps per epoch the moving
                # statistics otherwise stay near their initial values for many epochs, and
                # inference (which uses them) outputs one class for every image.
                layers.BatchNormalization(momentum=0.9, name=f"bn{index + 1}"),
                layers.ReLU(name=f"relu{index + 1}"),
            ]
            index += 1
        if block < len(params.conv_filters) - 1:
            stack.append(layers.MaxPooling2D((2, 2), name=f"pool{block + 1}"))
    pool = layers.GlobalAveragePooling2D if params.pooling == "avg" else layers.GlobalMaxPooling2D
    stack.append(pool(name="global_pool"))
    if params.dropout > 0:
        stack.append(layers.Dropout(params.dropout, name="dropout"))
    stack.append(layers.Dense(1, activation="sigmoid", name="output"))
    return stack


def fuse_batch_norm(model: keras.Model) -> None:
    """Train every image BatchNormalization layer with TensorFlow's fused kernel.

    Keras 3 builds batch norm in training from separate moment, normalise and update ops;
    TensorFlow's one fused op (and its fused gradient) does the same arithmetic in about
    a fifth less time per training step of ``aoi_cnn`` on a 2-core CPU
    (bench/train_throughput.py). Only the layer instance's ``call`` changes, so the saved
    .h5 holds a plain BatchNormalization and loads anywhere; inference and any case the
    fused op does not cover (masks, another axis or dtype) take Keras' own path.
    """
    from keras import layers

    for layer in model.layers:
        if type(layer) is not layers.BatchNormalization:
            continue
        if len(layer.input.shape) == 4 and layer.axis in (-1, 3) and layer.scale and layer.center:
            layer.call = _fused_call(layer)


def _fused_call(layer: keras.layers.BatchNormalization) -> Callable[..., Any]:
    import tensorflow as tf

    keras_call = layer.call

    def call(inputs, training=None, mask=None):
        if not (training and layer.trainable) or mask is not None or inputs.dtype != tf.float32:
            return keras_call(inputs, training=training, mask=mask)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, layer.gamma, layer.beta, epsilon=layer.epsilon, data_format="NHWC", is_training=True
        )
        # The fused op returns the unbiased batch variance; Keras' moving variance
        # averages the biased one, and a file must not depend on which path trained it.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), variance.dtype)
        variance = variance * (count - 1.0) / count
        layer.moving_mean.assign(layer.moving_mean * layer.momentum + mean * (1.0 - layer.momentum))
        layer.moving_variance.assign(layer.moving_variance * layer.momentum + variance * (1.0 - layer.momentum))
        return outputs

    return call


def edge_kernels() -> np.ndarray:
    """3x3 Sobel x/y, Prewitt x/y and zero-mean Gabor kernels at 0/45/90/135 degrees, (3, 3, 8)."""
    import numpy as np

    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    prewitt_x = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], dtype=np.float64)
    kernels = [sobel_x, sobel_x.T, prewitt_x, prewitt_x.T]
    yy, xx = np.mgrid[-1:2, -1:2].astype(np.float64)
    for degrees in (0, 45, 90, 135):
        theta = np.deg2rad(degrees)
        along = xx * np.cos(theta) + yy * np.sin(theta)
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        # sigma 1 px, wavelength 3 px: the finest line pattern a 3x3 kernel can hold.
        gabor = np.exp(-(along**2 + 0.25 * across**2) / 2) * np.cos(2 * np.pi * along / 3)
        kernels.append(gabor - gabor.mean())  # zero mean: responds to edges, not brightness
    return np.stack(kernels, axis=-1)


def place_edge_kernels(conv: keras.layers.Conv2D) -> int:
    """Put the edge kernels into the first filters of a built 3x3 Conv2D; returns how many.

    Each kernel sees every input channel with weight 1/channels (an edge of the image's
    brightness, whatever its colour) and is scaled to the L2 norm a glorot-uniform filter
    of this layer has on average, so its activations start in the range of the random
    filters beside it.
    """
    import numpy as np

    kernel, *bias = conv.get_weights()  # aoi_cnn's convolutions have no bias
    height, width, channels, filters = kernel.shape
    if (height, width) != (3, 3):
        raise ValueError(f"edge kernels are 3x3, {conv.name} has {height}x{width} kernels")
    bank = edge_kernels()
    count = min(filters, bank.shape[-1])
    limit = np.sqrt(6.0 / (height * width * (channels + filters)))
    target_norm = np.sqrt(height * width * channels * limit**2 / 3)
    for index in range(count):
        filt = np.repeat(bank[:, :, None, index] / channels, channels, axis=2)
        kernel[..., index] = filt * target_norm / np.linalg.norm(filt)
    conv.set_weights([kernel, *bias])
    return count


def save_model(
    model: keras.Model,
    path: Path | str,
    class_mapping: dict[str, int],
    params: ImageInput,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a Keras HDF5 file with the class mapping, preprocessing and training record.

    ``training`` says how the weights came about (initialisation, pruning); the model
    card and the evaluation report read it from the file, so it cannot drift from it.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    # A model rebuilt from a file (pruning) has only its input spec; ``training`` carries the rest.
    initialised = {"first_layer_init": params.first_layer_init} if isinstance(params, ModelParams) else {}
    record = {**initialised, **(training or {})}
    with h5py.File(path, "a") as handle:
        handle.attrs[MAPPING_ATTR] = json.dumps(class_mapping)
        handle.attrs[PREPROCESSING_ATTR] = json.dumps(preprocessing_of(params))
        handle.attrs[TRAINING_ATTR] = json.dumps(record)
    return path


