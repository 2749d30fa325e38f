"""Score images with a model file: the scoring pass of evaluate, the gate, predict and the service.

Every file first passes the pipeline's one image check (tasks.data.image_check, the limits of
params' validate section): what ingest would refuse gets that reason as its error, never
a label. Accepted images are decoded with the same function training used
(tasks.data.dataset.decode_image), in batches; a file that cannot be read or decoded gets an
error of its own and the others are still classified.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data.dataset import LabeledImage, decode_image, is_candidate_file, make_dataset
from tasks.data.image_check import ImageRejected, check_file
from tasks.errors import FanaoiError
from tasks.inference.metrics import REVIEW, verdicts
from tasks.inference.model_file import load_model, model_params_from_file, read_model_metadata
from tasks.params import ImageInput, ValidateParams

if TYPE_CHECKING:
    import keras


REVIEW_LABEL = "REVIEW"  # the label for parts a person must look at


# TensorFlow wraps op errors in "{{function_node ...}} message [Op:ReadFile] name:".
_TF_DECORATION = re.compile(r"\{\{function_node [^}]*\}\}|\s*\[Op:\w+\].*$", re.DOTALL)


@dataclass(frozen=True)
class Predictor:
    """A loaded model and what is needed to read its output."""

    model: keras.Model
    model_params: ImageInput
    class_names: tuple[str, str]  # by label: class_names[1] is the positive (defect) class
    threshold: float
    version: str | None = None
    review_band: tuple[float, float] | None = None

    def label(self, probability: float) -> str:
        """The class name for a positive-class probability (the defect class at or above the
        threshold), or REVIEW inside the card's review band."""
        verdict = int(verdicts([probability], self.threshold, self.review_band)[0])
        return REVIEW_LABEL if verdict == REVIEW else self.class_names[verdict]


def class_names_of(mapping: dict[str, int]) -> tuple[str, str]:
    by_label = {label: name for name, label in mapping.items()}
    return by_label[0], by_label[1]


def predictor_from_file(model_path: Path | str, threshold: float) -> Predictor:
    """A Predictor for a FanAOI .h5, with the mapping and preprocessing stored in the file."""
    model_path = Path(model_path)
    mapping = read_model_metadata(model_path)["class_mapping"]
    return Predictor(
        load_model(model_path), model_params_from_file(model_path), class_names_of(mapping), threshold
    )


def score_file(model_path: Path | str, images: Sequence[LabeledImage], batch_size: int) -> np.ndarray:
    """Probabilities of ``images`` from a model file, with the preprocessing stored in it."""
    return predict_probabilities(load_model(model_path), images, model_params_from_file(model_path), batch_size)


def expand_paths(paths: Iterable[Path | str], extensions: Sequence[str]) -> list[Path]:
    """Files as given; folders replaced by the image files under them, sorted."""
    suffixes = {e.lower() for e in extensions}
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(
                p for p in path.rglob("*")
                if p.is_file() and is_candidate_file(p) and p.suffix.lower() in suffixes
            ))
        else:
            files.append(path)
    if not files:
        raise FanaoiError(
            f"{', '.join(map(str, paths))}: no images ({'/'.join(sorted(suffixes))}) to classify"
        )
    return files


def probabilities_of(predictor: Predictor, files: Sequence[Path], batch_size: int) -> np.ndarray:
    """Positive-class probability per file; NaN where the file cannot be read or decoded."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(([str(f) for f in files], np.arange(len(files))))
    dataset = (
        dataset.map(
            lambda path, i: (decode_image(tf.io.read_file(path), predictor.model_params), i),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .ignore_errors()  # a bad file drops out here; its error is read again on its own below
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    probabilities = np.full(len(files), np.nan, dtype=np.float64)
    for images, indexes in dataset:
        probabilities[indexes.numpy()] = predictor.model.predict_on_batch(images).reshape(-1)
    return probabilities


def decode_error(path: Path, model_params: ImageInput) -> str:
    """Why one file cannot be turned into a model input."""
    import tensorflow as tf

    try:
        decode_image(tf.io.read_file(str(path)), model_params)
    except (tf.errors.OpError, ValueError) as exc:
        message = _TF_DECORATION.sub("", getattr(exc, "message", str(exc))).strip()
        return message.splitlines()[0] if message else type(exc).__name__
    return "not decoded"


def rejected_files(files: Sequence[Path], limits: ValidateParams) -> dict[int, str]:
    """Index -> reason for each file the pipeline's image check refuses (as ingest would)."""
    rejected = {}
    for index, path in enumerate(files):
        try:
            check_file(path, limits)
        except ImageRejected as exc:
            rejected[index] = str(exc)
    return rejected


def predict_files(
    predictor: Predictor, files: Sequence[Path], batch_size: int,
    limits: ValidateParams,
) -> list[dict[str, Any]]:
    """One result per file: label and positive-class probability, or the error.

    A file the image check refuses (``limits``: params' validate section) gets that reason
    as its error and is never shown to the model.
    """
    rejected = rejected_files(files, limits)
    checked = [index for index in range(len(files)) if index not in rejected]
    probabilities = np.full(len(files), np.nan, dtype=np.float64)
    if checked:
        probabilities[checked] = probabilities_of(predictor, [files[i] for i in checked], batch_size)
    results = []
    for index, (path, probability) in enumerate(zip(files, probabilities, strict=True)):
        if np.isnan(probability):
            error = rejected.get(index) or decode_error(path, predictor.model_params)
            results.append({"path": str(path), "label": None, "probability": None, "error": error})
        else:
            results.append({
                "path": str(path),
                "label": predictor.label(probability),
                "probability": float(probability),
                "error": None,
            })
    return results


def smoke_main(argv: Sequence[str]) -> None:
    """``python -m tasks.inference.predictor MODEL IMAGE...``: the publish smoke test's fresh
    process loads the file and prints the images' probabilities as JSON.

    The publish starts it through tasks.child_process: a killed publish leaves no
    TensorFlow process behind.
    """
    predictor = predictor_from_file(argv[0], threshold=0.5)
    probabilities = probabilities_of(predictor, [Path(p) for p in argv[1:]], batch_size=32)
    sys.stdout.write(json.dumps([float(p) for p in probabilities]) + "\n")


def predict_probabilities(
    model: keras.Model, images: Sequence[LabeledImage], model_params: ImageInput, batch_size: int
) -> np.ndarray:
    """Sigmoid output (probability of the positive class) for each image, in order."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    dataset = make_dataset(images, model_params, batch_size, cache_max_mb=0).map(lambda x, _: x)
    return model.predict(dataset, verbose=0).reshape(-1).astype(np.float32)


if __name__ == "__main__":
    smoke_main(sys.argv[1:])
