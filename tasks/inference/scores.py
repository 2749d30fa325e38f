"""Per-image scores as an artifact: evaluate writes the candidate's, the gate reads them.

``scores.csv`` holds the candidate's probability for every validation and test image of
the manifest; ``operating-point.json`` the threshold and review band evaluate chose from
them and the sha256 of the model they belong to. The gate decides from these files and
never scores the candidate again, so evaluate and the gate cannot disagree on the threshold.

The champion's scores on the same images are kept under ``validate.cache_dir``, keyed by the
champion's sha256 and the digest of the images scored: a night whose champion and
validation split did not change reads them instead of loading the champion.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data.dataset import LabeledImage, labels_of, select
from tasks.data.image_manifest import images_digest
from tasks.durable import atomic_write, read_json, sha256_of, write_json
from tasks.errors import FanaoiError
from tasks.inference.metrics import choose_threshold
from tasks.inference.model_file import load_model, model_params_from_file
from tasks.inference.predictor import predict_probabilities
from tasks.params import EvaluateParams

if TYPE_CHECKING:
    import keras

SCORES_FILE = "scores.csv"
OPERATING_POINT_FILE = "operating-point.json"
CHAMPION_SCORES_FOLDER = "champion-scores"
_COLUMNS = ("path", "sha256", "split", "label", "class_name", "defect_type", "probability")


class ScoresError(FanaoiError):
    """The scores are missing or belong to another model; the message says which stage to rerun."""


def write_scores(reports_dir: Path, scored: Mapping[str, tuple[Sequence[LabeledImage], np.ndarray]]) -> Path:
    """``scored``: split -> (images, probabilities), written in that order to scores.csv."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    for split, (images, probabilities) in scored.items():
        for image, probability in zip(images, probabilities, strict=True):
            writer.writerow([image.path.as_posix(), image.sha256, split, image.label, image.class_name,
                             image.defect_type or "", repr(float(probability))])
    path = Path(reports_dir) / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode("utf-8")))
    return path


def read_scores(reports_dir: Path | str, split: str) -> tuple[list[LabeledImage], np.ndarray]:
    """The images of ``split`` in scores.csv, in the order evaluate scored them, and their probabilities."""
    path = Path(reports_dir) / SCORES_FILE
    images, probabilities = [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["split"] != split:
                    continue
                images.append(LabeledImage(Path(row["path"]), row["class_name"], int(row["label"]), row["sha256"],
                                           split, row["defect_type"] or None))
                probabilities.append(float(row["probability"]))
    except FileNotFoundError:
        raise ScoresError(f"{path}: no scores; run `fanaoi evaluate` (or `dvc repro evaluate`) first") from None
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise ScoresError(f"{path}: cannot be read ({exc}); rerun `fanaoi evaluate`") from None
    return images, np.asarray(probabilities, dtype=np.float64)


def read_operating_point(reports_dir: Path | str, model_sha256: str, model_path: Path | str) -> dict[str, Any]:
    """Evaluate's threshold, its reason and the review band, checked to belong to ``model_path``."""
    path = Path(reports_dir) / OPERATING_POINT_FILE
    point = read_json(path)
    if not point:
        raise ScoresError(f"{path}: missing or unreadable; run `fanaoi evaluate` (or `dvc repro evaluate`) first")
    if point.get("model_sha256") != model_sha256:
        raise ScoresError(
            f"{path}: holds the scores of {point.get('model', 'another model')} as evaluate saw it, not of "
            f"{model_path} as it is now (another sha256); rerun `fanaoi evaluate`, or pass the file as "
            f"`fanaoi gate --model {model_path}`, which scores it first"
        )
    return point


HELD_OUT = ("validation", "test")


def score_candidate(
    model_path: Path | str, images: Sequence[LabeledImage], reports_dir: Path | str, evaluate: EvaluateParams,
    target_escape_rate: float | None, *, model: keras.Model | None = None,
) -> dict[str, Any]:
    """Score the held-out images of the manifest once and choose the operating point from them.

    Writes scores.csv and operating-point.json; returns per split the images, labels and
    probabilities, and the operating point. The evaluate stage calls it, and so does
    ``fanaoi gate --model`` for a model evaluate never scored: the threshold rule runs only here.
    """
    model_path = Path(model_path)
    model = model if model is not None else load_model(model_path)
    model_params = model_params_from_file(model_path)
    held_out = {split: select(images, split) for split in HELD_OUT}
    scores = {split: predict_probabilities(model, subset, model_params, evaluate.batch_size)
              for split, subset in held_out.items()}
    labels = {split: np.asarray(labels_of(subset)) for split, subset in held_out.items()}
    chosen = choose_threshold(labels["validation"], scores["validation"], target_escape_rate, evaluate.threshold)
    point = {
        "threshold": chosen["threshold"], "source": chosen["source"],
        "review_band": list(evaluate.review_band) if evaluate.review_band else None,
        "model": str(model_path), "model_sha256": sha256_of(model_path),
    }
    write_scores(Path(reports_dir), {split: (held_out[split], scores[split]) for split in HELD_OUT})
    write_json(Path(reports_dir) / OPERATING_POINT_FILE, point)
    return {"images": held_out, "labels": labels, "scores": scores, "point": point}


def scored_by_evaluate(reports_dir: Path | str, model_path: Path | str) -> bool:
    """True when the scores in ``reports_dir`` are those of the file at ``model_path`` as it is now."""
    recorded = read_json(Path(reports_dir) / OPERATING_POINT_FILE).get("model_sha256")
    return Path(model_path).is_file() and recorded == sha256_of(Path(model_path))


def cached_scores(
    model_sha256: str, images: Sequence[LabeledImage], cache_dir: Path | str | None,
    score: Callable[[], np.ndarray],
) -> tuple[np.ndarray, bool]:
    """``score()`` of ``images`` by the model with ``model_sha256``, reused from ``cache_dir`` while
    neither changed; returns (probabilities, True when they came from the cache).

    Only the latest entry is kept: a new champion or a new validation split replaces it.
    """
    if cache_dir is None:
        return score(), False
    folder = Path(cache_dir) / CHAMPION_SCORES_FOLDER
    key = f"{model_sha256[:20]}-{images_digest(images)[:20]}"
    entry = folder / f"{key}.json"
    stored = read_json(entry).get("probabilities")
    if isinstance(stored, list) and len(stored) == len(images):
        return np.asarray(stored, dtype=np.float64), True
    probabilities = score()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink(missing_ok=True)
    write_json(entry, {"model_sha256": model_sha256, "probabilities": [float(p) for p in probabilities]}, indent=None)
    return probabilities, False

