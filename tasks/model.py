"""Build, save and load the Keras GO/NG classifier.

The class mapping and preprocessing travel inside the .h5 file (HDF5 attributes), so a
model file on its own is enough to predict correctly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import FanaoiError
from tasks.params import ModelParams

if TYPE_CHECKING:
    import keras

MAPPING_ATTR = "fanaoi_class_mapping"
PREPROCESSING_ATTR = "fanaoi_preprocessing"


class ModelFileError(FanaoiError):
    """A model file is missing or cannot be loaded; the message names it and the fix."""


def build_model(params: ModelParams, learning_rate: float, jit_compile: bool = False) -> keras.Model:
    """The seed's CNN (default) or a smaller variant, compiled for binary classification."""
    import keras
    from keras import layers

    height, width = params.input_size
    model = keras.Sequential(name=params.architecture)
    model.add(keras.Input(shape=(height, width, params.channels)))
    filters = params.conv_filters if params.architecture == "seed_cnn" else params.conv_filters[:1]
    for count in filters:
        model.add(layers.Conv2D(count, (3, 3), activation="relu"))
        model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Flatten())
    model.add(layers.Dense(params.dense_units, activation="relu"))
    if params.dropout > 0:
        model.add(layers.Dropout(params.dropout))
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def preprocessing_of(params: ModelParams) -> dict[str, Any]:
    """What a consumer must do to an image before calling the model."""
    return {
        "input_size": list(params.input_size),
        "color_mode": params.color_mode,
        "scale": "divide by 255",
        "resize": "bilinear, antialias",
    }


def save_model(
    model: keras.Model, path: Path | str, class_mapping: dict[str, int], params: ModelParams
) -> Path:
    """Write a Keras HDF5 file with the class mapping and preprocessing as attributes."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    with h5py.File(path, "a") as handle:
        handle.attrs[MAPPING_ATTR] = json.dumps(class_mapping)
        handle.attrs[PREPROCESSING_ATTR] = json.dumps(preprocessing_of(params))
    return path


def read_model_metadata(path: Path | str) -> dict[str, Any]:
    """Class mapping and preprocessing stored in a FanAOI .h5 file, without TensorFlow."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            return {
                "class_mapping": json.loads(handle.attrs[MAPPING_ATTR]),
                "preprocessing": json.loads(handle.attrs[PREPROCESSING_ATTR]),
            }
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found; train one with `fanaoi train`") from None
    except (OSError, KeyError) as exc:
        raise ModelFileError(
            f"{path}: not a FanAOI Keras .h5 file ({exc}); retrain or restore it"
        ) from None


def model_params_from_file(path: Path | str) -> ModelParams:
    """The ModelParams a saved model expects its input in (size and colour mode)."""
    preprocessing = read_model_metadata(path)["preprocessing"]
    return ModelParams(
        input_size=tuple(preprocessing["input_size"]), color_mode=preprocessing["color_mode"]
    )


def load_model(path: Path | str) -> keras.Model:
    """Load a .h5 model; a missing or corrupt file raises ModelFileError naming it."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; train one with `fanaoi train`")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # h5py, Keras and OS errors all mean "unusable file"
        raise ModelFileError(
            f"{path}: cannot be loaded as a Keras model ({type(exc).__name__}: {exc}); "
            f"retrain or restore it"
        ) from None
