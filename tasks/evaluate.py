"""The evaluate stage: score the candidate and compare it with its own last epoch.

Keras' last-epoch accuracy is an average over batches while the weights were still
moving; ``model.evaluate`` scores the final weights. A large gap between the two on the
validation split points at a preprocessing or determinism bug, so it is reported and
flagged. Classification metrics use the AOI vocabulary: an *escape* is an NG part passed
as GO (the costly error), an *overkill* is a GO part rejected.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.dataset import LabeledImage, defect_types_of, labels_of, list_images, make_dataset, require_split, select
from tasks.errors import FanaoiError
from tasks.model import load_model, read_model_metadata
from tasks.params import ModelParams, Params
from tasks.train import read_history

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def predict_probabilities(
    model: keras.Model, images: Sequence[LabeledImage], model_params: ModelParams, batch_size: int
) -> np.ndarray:
    """Sigmoid output (probability of the positive class) for each image, in order."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    dataset = make_dataset(images, model_params, batch_size).map(lambda x, _: x)
    return model.predict(dataset, verbose=0).reshape(-1).astype(np.float32)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); None with one class."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    position = 0
    while position < len(scores):
        end = position
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[position]:
            end += 1
        ranks[order[position : end + 1]] = (position + end) / 2 + 1
        position = end + 1
    positive_rank_sum = ranks[labels == 1].sum()
    u = positive_rank_sum - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(positives) * len(negatives)))


def classification_metrics(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, escape and overkill rate, AUC and the confusion counts.

    Label 1 is the defect class (NG); a probability >= threshold predicts NG.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(probabilities, dtype=np.float64)
    predicted = (scores >= threshold).astype(np.int64)
    tp = int(np.sum((predicted == 1) & (labels == 1)))
    tn = int(np.sum((predicted == 0) & (labels == 0)))
    fp = int(np.sum((predicted == 1) & (labels == 0)))
    fn = int(np.sum((predicted == 0) & (labels == 1)))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    escape_rate = _ratio(fn, fn + tp)
    overkill_rate = _ratio(fp, fp + tn)
    return {
        "count": int(len(labels)),
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": 1.0 - (escape_rate + overkill_rate) / 2,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "escape_rate": escape_rate,
        "overkill_rate": overkill_rate,
        "auc": roc_auc(labels, scores),
        "threshold": float(threshold),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def roc_points(labels: np.ndarray, scores: np.ndarray) -> list[dict[str, float]]:
    """(false positive rate, true positive rate, threshold) at every distinct score."""
    labels = np.asarray(labels)
    positives, negatives = max(int(labels.sum()), 1), max(int((labels == 0).sum()), 1)
    points = [{"fpr": 0.0, "tpr": 0.0, "threshold": 1.0}]
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        points.append({
            "fpr": float(np.sum(predicted & (labels == 0)) / negatives),
            "tpr": float(np.sum(predicted & (labels == 1)) / positives),
            "threshold": float(threshold),
        })
    return points


# Escape rates carry the upper end of their two-sided 95 % Clopper-Pearson interval:
# 0 escapes among 40 NG images is "at most 8.8 %", not 0 %.
ESCAPE_BOUND_CONFIDENCE = 0.95


def escape_upper_bound(escapes: int, count: int) -> float:
    """Exact binomial (Clopper-Pearson) upper limit of the 95 % interval of escapes / count.

    The beta quantile, not a normal approximation, so it holds for small counts and for
    zero escapes; with no images nothing is known and the bound is 1.
    """
    from scipy.stats import beta

    if escapes >= count:
        return 1.0
    quantile = 1 - (1 - ESCAPE_BOUND_CONFIDENCE) / 2
    return float(beta.ppf(quantile, escapes + 1, count - escapes))


def escapes_by_type(
    labels: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    types: Sequence[str | None],
) -> dict[str, dict[str, Any]]:
    """Per defect type of the positive-class images: count, escapes, rate and its upper bound.

    ``predicted`` holds 1 for an image predicted NG; ``types`` comes from
    ``LabeledImage.defect_type``. Types are sorted by name.
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({t for t, label in zip(types, labels, strict=True) if label == 1 and t is not None}):
        members = (labels == 1) & np.array([t == kind for t in types])
        count, escapes = int(members.sum()), int(np.sum(members & (predicted == 0)))
        per_type[kind] = {
            "count": count, "escapes": escapes, "escape_rate": _ratio(escapes, count),
            "escape_rate_upper95": escape_upper_bound(escapes, count),
        }
    return per_type


def escape_bounds(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    types: Sequence[str | None],
) -> dict[str, Any]:
    """What goes beside classification_metrics: the escape rate's upper bound, and per type.

    The same threshold rule as classification_metrics: a probability >= threshold is NG.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predicted = (np.asarray(probabilities, dtype=np.float64) >= threshold).astype(np.int64)
    positives = labels == 1
    return {
        "escape_rate_upper95": escape_upper_bound(int(np.sum(positives & (predicted == 0))),
                                                  int(positives.sum())),
        "defect_types": escapes_by_type(labels, predicted, types),
    }


def defect_type_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per defect type, e.g. ``crack: 2 of 12 escaped, 0.1667 (95 % upper 0.4841)``."""
    return [
        f"{kind}: {row['escapes']} of {row['count']} escaped, {row['escape_rate']:.4f} "
        f"(95 % upper {row['escape_rate_upper95']:.4f})"
        for kind, row in metrics.get("defect_types", {}).items()
    ]


def compare_with_last_epoch(
    last_epoch: dict[str, float],
    evaluated: dict[str, dict[str, float]],
    max_gap: float,
    max_overfit: float,
) -> dict[str, Any]:
    """Side by side: last epoch's logged numbers vs evaluate() on the final weights."""
    validation_gap = abs(evaluated["validation"]["accuracy"] - last_epoch["val_accuracy"])
    overfit = evaluated["train"]["accuracy"] - evaluated["validation"]["accuracy"]
    return {
        "last_epoch_train_accuracy": last_epoch["accuracy"],
        "last_epoch_train_loss": last_epoch["loss"],
        "last_epoch_validation_accuracy": last_epoch["val_accuracy"],
        "last_epoch_validation_loss": last_epoch["val_loss"],
        "evaluate_train_accuracy": evaluated["train"]["accuracy"],
        "evaluate_train_loss": evaluated["train"]["loss"],
        "evaluate_validation_accuracy": evaluated["validation"]["accuracy"],
        "evaluate_validation_loss": evaluated["validation"]["loss"],
        "train_accuracy_gap": evaluated["train"]["accuracy"] - last_epoch["accuracy"],
        "validation_accuracy_gap": validation_gap,
        "train_validation_gap": overfit,
        "validation_gap_flag": bool(validation_gap > max_gap),
        "overfit_flag": bool(overfit > max_overfit),
    }


def read_last_epoch(history_csv: Path) -> dict[str, float]:
    rows = read_history(history_csv)
    if not rows:
        raise FanaoiError(f"{history_csv}: no epochs recorded; rerun the train stage")
    return rows[-1]


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_plots(
    reports_dir: Path, labels: np.ndarray, scores: np.ndarray, threshold: float, classes: Sequence[str]
) -> None:
    """Confusion pairs and ROC points as CSV, the form `dvc plots` reads."""
    plots = reports_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    predicted = (scores >= threshold).astype(int)
    _write_csv(
        plots / "confusion.csv",
        [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(labels, predicted, strict=True)],
        ("actual", "predicted"),
    )
    _write_csv(plots / "roc.csv", roc_points(labels, scores), ("fpr", "tpr", "threshold"))


def model_record(model_path: Path) -> dict[str, Any]:
    """How the scored weights came about, from the model file (params may have changed since).

    A file saved before the training record existed gives None for each entry.
    """
    training = read_model_metadata(model_path)["training"]
    return {key: training.get(key) for key in ("first_layer_init", "init", "pruned")}


def run_evaluate(
    params: Params,
    model_path: Path | str = "models/candidate.h5",
    reports_dir: Path | str = "reports",
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """The evaluate stage: writes reports/evaluation.json and the plot CSVs."""
    model_path, reports_dir = Path(model_path), Path(reports_dir)
    model = load_model(model_path)
    model.compile(loss="binary_crossentropy", metrics=["accuracy"])
    images = list_images(params.data.dir, params.data)
    batch = params.train.batch_size
    evaluated: dict[str, dict[str, float]] = {}
    scored: dict[str, dict[str, Any]] = {}
    for split in ("train", "validation", "test"):
        subset = select(images, split)
        if split != "test":
            require_split(subset, split, params.data.dir)
            loss, accuracy = model.evaluate(
                make_dataset(subset, params.model, batch), verbose=0, return_dict=False
            )
            evaluated[split] = {"loss": float(loss), "accuracy": float(accuracy)}
        if split != "train":
            labels = np.asarray(labels_of(subset))
            scores = predict_probabilities(model, subset, params.model, batch)
            scored[split] = classification_metrics(labels, scores, params.evaluate.threshold)
            scored[split] |= escape_bounds(labels, scores, params.evaluate.threshold, defect_types_of(subset))
            if split == "validation":
                write_plots(reports_dir, labels, scores, params.evaluate.threshold, params.data.classes)
    comparison = compare_with_last_epoch(
        read_last_epoch(reports_dir / "history.csv"), evaluated,
        params.evaluate.max_gap, params.evaluate.max_overfit,
    )
    result = {**scored, "last_epoch_vs_evaluate": comparison, "model": model_record(model_path)}
    (reports_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    validation = scored["validation"]
    report(
        f"validation accuracy {validation['accuracy']:.4f}, escape rate "
        f"{validation['escape_rate']:.4f}, overkill rate {validation['overkill_rate']:.4f}; "
        f"evaluate vs last epoch gap {comparison['validation_accuracy_gap']:.4f}"
        + (" (FLAGGED: above evaluate.max_gap)" if comparison["validation_gap_flag"] else "")
        + (" (FLAGGED: overfit above evaluate.max_overfit)" if comparison["overfit_flag"] else "")
    )
    report(f"validation escape rate 95 % upper bound {validation['escape_rate_upper95']:.4f}; by defect type: "
           + "; ".join(defect_type_lines(validation)))
    return result
