"""Export a published version to TFLite, ONNX or a TensorFlow SavedModel, checked against Keras.

An export lives beside its version in the registry::

    versions/<v>/exports/model.tflite | model.onnx | saved_model/

Before it is put there, it is run by the runtime a consumer would use (LiteRT,
onnxruntime, TensorFlow) on validation images decoded with the version's own
preprocessing, and its probabilities are compared with Keras's on the same images. A
float export must agree within ``export.max_abs_diff``; otherwise nothing is kept. The
version's model card (card.json and the copy inside model.h5, and the champion's when the
version is champion) lists every export with its size and the difference measured.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data.dataset import decode_all
from tasks.data.image_manifest import read_split
from tasks.durable import replace_path
from tasks.errors import FanaoiError
from tasks.inference.model_file import load_model, model_params_from_file
from tasks.params import DataParams, ImageInput, Params
from tasks.registry.champion import published_version, read_embedded_card
from tasks.registry.publish import update_card
from tasks.registry.store import registry_lock, utc_now

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# format -> (file or folder name under exports/, keras Model.export format, runtime package)
FORMATS: dict[str, tuple[str, str, str]] = {
    "tflite": ("model.tflite", "litert", "ai-edge-litert"),
    "onnx": ("model.onnx", "onnx", "onnxruntime"),
    "savedmodel": ("saved_model", "tf_saved_model", "tensorflow"),
}
EXPORTS_DIR = "exports"
PREDICT_BATCH = 64


class ExportError(FanaoiError):
    """A version cannot be exported, or its export does not reproduce Keras; nothing is kept."""


def export_version(params: Params, fmt: str, version: str | None = None) -> dict[str, Any]:
    """Export ``version`` (default: the champion) as ``fmt``; returns the entry put on its card."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    registry_dir = Path(params.registry.dir)
    version, folder = published_version(
        registry_dir, version, error=ExportError, hint="(see `fanaoi history`)"
    )
    model_params = model_params_from_file(folder / "model.h5")
    images = check_images(params.data, Path(params.paths.reports), model_params, params.export.check_images)
    model = load_model(folder / "model.h5")
    expected = model.predict(images, batch_size=PREDICT_BATCH, verbose=0).reshape(-1)

    name, keras_format, runtime = FORMATS[fmt]
    exports = folder / EXPORTS_DIR
    exports.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=exports, prefix=".export-"))
    try:
        written = _write(model, staging / name, keras_format)
        difference = float(np.max(np.abs(RUNNERS[fmt](written, images) - expected)))
        if not difference < params.export.max_abs_diff:  # NaN fails too
            raise ExportError(
                f"{folder / EXPORTS_DIR / name}: the {fmt} export differs from Keras by up to "
                f"{difference:.3g} on {len(images)} validation images (export.max_abs_diff = "
                f"{params.export.max_abs_diff:g}); not kept. Check the {runtime} version, or "
                f"raise export.max_abs_diff in params.yaml if the difference is acceptable"
            )
        entry = {
            "format": fmt,
            "path": f"{EXPORTS_DIR}/{name}",
            "bytes": _size_of(written),
            "max_abs_diff": difference,
            "checked_images": len(images),
            "runtime": f"{runtime} {metadata.version(runtime)}",
            "time": utc_now(),
        }
        with registry_lock(registry_dir, params.registry.lock_timeout):
            replace_path(written, exports / name)
            _record_on_cards(registry_dir, version, fmt, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s as %s: %s (max abs difference %.3g)", version, fmt, exports / name, difference)
    return entry


def check_images(data: DataParams, reports_dir: Path, model_params: ImageInput, count: int) -> np.ndarray:
    """Up to ``count`` validation images of the manifest as one float32 batch, preprocessed for the model."""
    images = read_split(reports_dir, data, "validation")[:count]
    if not images:
        raise ExportError(
            f"{data.dir}: no validation images to check the export on; point data.dir in "
            f"params.yaml at the data set the model was trained on"
        )
    return decode_all(images, model_params)


def _write(model: keras.Model, path: Path, keras_format: str) -> Path:
    model.export(str(path), format=keras_format, verbose=False)
    return path


def run_tflite(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities from the LiteRT interpreter (the runtime of TFLite consumers)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities from onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.astype(np.float32)}
    return np.asarray(session.run(None, feed)[0]).reshape(-1)


def run_saved_model(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities from the SavedModel's ``serve`` endpoint, loaded by TensorFlow alone."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return np.concatenate([
        loaded.serve(tf.constant(images[start:start + PREDICT_BATCH])).numpy().reshape(-1)
        for start in range(0, len(images), PREDICT_BATCH)
    ])


RUNNERS: dict[str, Callable[[Path, np.ndarray], np.ndarray]] = {
    "tflite": run_tflite,
    "onnx": run_onnx,
    "savedmodel": run_saved_model,
}


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _record_on_cards(registry_dir: Path, version: str, fmt: str, entry: dict[str, Any]) -> None:
    """List the export on the version's card (and the champion's, if it is the champion)."""
    folder = registry_dir / "versions" / version
    card = read_embedded_card(folder / "model.h5")
    card["exports"] = {**card.get("exports", {}), fmt: entry}
    update_card(registry_dir, version, card)
