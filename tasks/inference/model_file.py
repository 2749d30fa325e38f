"""Read a FanAOI .h5 model file: its class mapping, preprocessing and training record.

The class mapping and preprocessing travel inside the .h5 file (HDF5 attributes), so a
model file on its own is enough to predict correctly. Writing them is the model
package's job (``tasks.model.network.save_model``); every consumer reads them here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import FanaoiError
from tasks.params import ImageInput

if TYPE_CHECKING:
    import keras


MAPPING_ATTR = "fanaoi_class_mapping"


PREPROCESSING_ATTR = "fanaoi_preprocessing"


TRAINING_ATTR = "fanaoi_training"


class ModelFileError(FanaoiError):
    """A model file is missing or cannot be loaded; the message names it and the fix."""


def preprocessing_of(params: ImageInput) -> dict[str, Any]:
    """What a consumer must do to an image before calling the model."""
    return {
        "input_size": list(params.input_size),
        "color_mode": params.color_mode,
        "scale": "divide by 255",
        "resize": "bilinear, antialias, rounded to 8 bits",
    }


def read_model_metadata(path: Path | str) -> dict[str, Any]:
    """Class mapping, preprocessing and training record of a FanAOI .h5 file, without TensorFlow."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            return {
                "class_mapping": json.loads(handle.attrs[MAPPING_ATTR]),
                "preprocessing": json.loads(handle.attrs[PREPROCESSING_ATTR]),
                # files written before the training record existed have none
                "training": json.loads(handle.attrs.get(TRAINING_ATTR, "{}")),
            }
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found; train one with `fanaoi train`") from None
    except (OSError, KeyError) as exc:
        raise ModelFileError(
            f"{path}: not a FanAOI Keras .h5 file ({exc}); retrain or restore it"
        ) from None


def model_params_from_file(path: Path | str) -> ImageInput:
    """What a saved model expects its input in (size and colour mode)."""
    return image_input_of(read_model_metadata(path)["preprocessing"])


def image_input_of(preprocessing: dict[str, Any]) -> ImageInput:
    """The input spec of a model from its recorded preprocessing (model file or model card)."""
    return ImageInput(input_size=tuple(preprocessing["input_size"]), color_mode=preprocessing["color_mode"])


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
