"""The evaluate stage: score the candidate and compare it with the epoch it kept.

Training keeps the weights of one epoch (``tasks.model.history.kept_epoch``). Keras' logged
train accuracy for that epoch is an average over batches while the weights were still
moving (with dropout and augmentation on); ``model.evaluate`` scores the kept weights.
A large gap between the two on the validation split points at a preprocessing or determinism bug, so it is reported and
flagged. Classification metrics use the AOI vocabulary: an *escape* is an NG part passed
as GO (the costly error), an *overkill* is a GO part rejected.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data.dataset import (
    UNTYPED,
    LabeledImage,
    defect_types_of,
    labels_of,
    list_images,
    make_dataset,
    require_split,
    select,
)
from tasks.durable import write_stage_report
from tasks.errors import FanaoiError
from tasks.model.history import read_history
from tasks.model.network import load_model, model_params_from_file, read_model_metadata
from tasks.params import ImageInput, Params

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def predict_probabilities(
    model: keras.Model, images: Sequence[LabeledImage], model_params: ImageInput, batch_size: int
) -> np.ndarray:
    """Sigmoid output (probability of the positive class) for each image, in order."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    dataset = make_dataset(images, model_params, batch_size, cache_max_mb=0).map(lambda x, _: x)
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


REVIEW = -1  # a verdict for a person: the probability lies in the review band
KEY_METRICS = ("accuracy", "escape_rate", "overkill_rate")  # in every metrics file: diffed run to run


def verdicts(
    probabilities: Sequence[float] | np.ndarray, threshold: float, review_band: Sequence[float] | None = None
) -> np.ndarray:
    """The decision rule, in one place: 1 (defect) at or above the threshold, else 0, and
    REVIEW for probabilities in ``[review_band[0], review_band[1])`` when a band is set."""
    scores = np.asarray(probabilities, dtype=np.float64)
    decided = (scores >= threshold).astype(np.int64)
    if review_band is not None:
        low, high = review_band
        decided[(scores >= low) & (scores < high)] = REVIEW
    return decided


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    review_band: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, escape and overkill rate, AUC and the confusion counts.

    Label 1 is the defect class (NG); a probability >= threshold predicts NG. With a
    review band, ``review_rate`` is the share of parts sent to a person and the
    ``*_after_review`` rates count only the parts the model decided alone (a reviewed
    part is neither an escape nor an overkill); the other numbers ignore the band.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(probabilities, dtype=np.float64)
    predicted = verdicts(scores, threshold)
    tp = int(np.sum((predicted == 1) & (labels == 1)))
    tn = int(np.sum((predicted == 0) & (labels == 0)))
    fp = int(np.sum((predicted == 1) & (labels == 0)))
    fn = int(np.sum((predicted == 0) & (labels == 1)))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    escape_rate = _ratio(fn, fn + tp)
    overkill_rate = _ratio(fp, fp + tn)
    decided = verdicts(scores, threshold, review_band)
    return {
        "count": int(len(labels)),
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": 1.0 - (escape_rate + overkill_rate) / 2,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "escape_rate": escape_rate,
        "overkill_rate": overkill_rate,
        "review_rate": _ratio(int(np.sum(decided == REVIEW)), len(labels)),
        "escape_rate_after_review": _ratio(int(np.sum((decided == 0) & (labels == 1))), fn + tp),
        "overkill_rate_after_review": _ratio(int(np.sum((decided == 1) & (labels == 0))), fp + tn),
        "auc": roc_auc(labels, scores),
        "threshold": float(threshold),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def calibrate_threshold(labels: np.ndarray, scores: np.ndarray, target_escape_rate: float) -> float:
    """The NG threshold that keeps the escape rate of new NG parts within the target with the
    least overkill, midway in the gap of scores where it may lie.

    Letting ``a`` of ``n`` validation NG images through at the threshold is not enough: a
    new NG part scores below the ``(a + 1)``-th lowest NG score with probability
    ``(a + 1) / (n + 1)`` (its rank among the ``n + 1`` is uniform when validation and line
    parts come from the same process), so ``a`` is the largest count with that within the
    target (split-conformal bound). With 233 NG images and 0.005 that is 0, not 1.

    The highest threshold that lets ``a`` through also rejects the fewest GO parts; every
    threshold down to the next GO score below it rejects exactly as many. On well separated
    validation scores that gap is wide, and its top edge sits right under an NG image: new
    NG parts scored a little lower would pass. The middle of the gap keeps a margin on both
    sides at no cost on validation.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    positives = np.sort(scores[labels == 1])
    allowed_escapes = max(math.floor(target_escape_rate * (len(positives) + 1) + 1e-9) - 1, 0)
    if allowed_escapes >= len(positives):
        return 1.0
    highest = float(positives[allowed_escapes])
    below = scores[(labels == 0) & (scores < highest)]
    floor = float(below.max()) if below.size else 0.0
    return (floor + highest) / 2


def defects_needed(target_escape_rate: float) -> int:
    """NG images a validation set needs before an escape rate of ``target`` can be told
    apart from zero: one escape among them must be within the target."""
    return math.ceil(1 / target_escape_rate - 1e-9) if target_escape_rate > 0 else 0


def choose_threshold(
    labels: np.ndarray, scores: np.ndarray, target_escape_rate: float | None, default: float
) -> dict[str, Any]:
    """The NG threshold and why: calibrated on validation to the target escape rate, or
    ``default`` (evaluate.threshold) when there is no target or too few NG images for it."""
    if target_escape_rate is None:
        return {"threshold": default, "source": "evaluate.threshold (gate.target_escape_rate is null)"}
    defects, needed = int(np.sum(np.asarray(labels) == 1)), defects_needed(target_escape_rate)
    if defects < needed:
        return {
            "threshold": default,
            "source": f"evaluate.threshold: validation holds {defects} NG images, fewer than the "
                      f"{needed} that gate.target_escape_rate {target_escape_rate} needs; add NG "
                      f"images or raise the target to calibrate",
        }
    return {
        "threshold": calibrate_threshold(labels, scores, target_escape_rate),
        "source": f"calibrated on {defects} validation NG images to gate.target_escape_rate {target_escape_rate}",
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

    Like ``escape_rate``, the review band is ignored: an NG part below the threshold is an
    escape (``escape_rate_after_review`` is the band's business).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predicted = verdicts(probabilities, threshold)
    positives = labels == 1
    return {
        "escape_rate_upper95": escape_upper_bound(int(np.sum(positives & (predicted == 0))),
                                                  int(positives.sum())),
        "defect_types": escapes_by_type(labels, predicted, types),
    }


def image_metrics(
    images: Sequence[LabeledImage],
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    review_band: Sequence[float] | None = None,
) -> dict[str, Any]:
    """classification_metrics of scored images with the escape bounds, overall and per type."""
    labels = labels_of(images)
    return (classification_metrics(labels, probabilities, threshold, review_band)
            | escape_bounds(labels, probabilities, threshold, defect_types_of(images)))


def defect_type_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per defect type, e.g. ``crack: 2 of 12 escaped, 0.1667 (95 % upper 0.4841)``;
    none when NG has no type subfolders (the one type, untyped, repeats the overall rate)."""
    types = metrics.get("defect_types", {})
    if set(types) <= {UNTYPED}:
        return []
    return [
        f"{kind}: {row['escapes']} of {row['count']} escaped, {row['escape_rate']:.4f} "
        f"(95 % upper {row['escape_rate_upper95']:.4f})"
        for kind, row in types.items()
    ]


def compare_with_kept_epoch(
    kept_epoch: dict[str, float],
    evaluated: dict[str, dict[str, float]],
    max_gap: float,
    max_overfit: float,
) -> dict[str, Any]:
    """Side by side: the kept epoch's logged numbers vs evaluate() on its weights."""
    validation_gap = abs(evaluated["validation"]["accuracy"] - kept_epoch["val_accuracy"])
    overfit = evaluated["train"]["accuracy"] - evaluated["validation"]["accuracy"]
    return {
        "kept_epoch": int(kept_epoch["epoch"]),
        "kept_epoch_train_accuracy": kept_epoch["accuracy"],
        "kept_epoch_train_loss": kept_epoch["loss"],
        "kept_epoch_validation_accuracy": kept_epoch["val_accuracy"],
        "kept_epoch_validation_loss": kept_epoch["val_loss"],
        "evaluate_train_accuracy": evaluated["train"]["accuracy"],
        "evaluate_train_loss": evaluated["train"]["loss"],
        "evaluate_validation_accuracy": evaluated["validation"]["accuracy"],
        "evaluate_validation_loss": evaluated["validation"]["loss"],
        "train_accuracy_gap": evaluated["train"]["accuracy"] - kept_epoch["accuracy"],
        "validation_accuracy_gap": validation_gap,
        "train_validation_gap": overfit,
        "validation_gap_flag": bool(validation_gap > max_gap),
        "overfit_flag": bool(overfit > max_overfit),
    }


def read_kept_epoch(history_csv: Path, epoch: int | None) -> dict[str, float]:
    """The logged row of the epoch whose weights the model holds (the last one for models
    saved before the kept epoch was recorded)."""
    rows = read_history(history_csv)
    if not rows:
        raise FanaoiError(f"{history_csv}: no epochs recorded; rerun the train stage")
    if epoch is None:
        return rows[-1]
    for row in rows:
        if int(row["epoch"]) == epoch:
            return row
    raise FanaoiError(
        f"{history_csv}: has no epoch {epoch}, which the candidate's weights come from; "
        f"the history and the model are from different runs: rerun the train stage"
    )


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
    return {key: training.get(key) for key in ("first_layer_init", "init", "pruned", "best_epoch", "epochs_run")}


def run_evaluate(
    params: Params, model_path: Path | str | None = None, reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """The evaluate stage: writes reports/evaluation.json and the plot CSVs."""
    model_path, reports_dir = params.paths.chosen(model_path, reports_dir)
    model = load_model(model_path)
    model.compile(loss="binary_crossentropy", metrics=["accuracy"])
    model_params = model_params_from_file(model_path)  # color_mode auto was resolved in training
    images = list_images(params.data.dir, params.data)
    batch = params.evaluate.batch_size
    evaluated: dict[str, dict[str, float]] = {}
    for split in ("train", "validation"):
        subset = select(images, split)
        require_split(subset, split, params.data.dir)
        single_pass = make_dataset(subset, model_params, batch, cache_max_mb=0)
        loss, accuracy = model.evaluate(single_pass, verbose=0, return_dict=False)
        evaluated[split] = {"loss": float(loss), "accuracy": float(accuracy)}
    held_out = {split: select(images, split) for split in ("validation", "test")}
    scores = {split: predict_probabilities(model, subset, model_params, batch) for split, subset in held_out.items()}
    labels = {split: np.asarray(labels_of(subset)) for split, subset in held_out.items()}
    chosen = choose_threshold(labels["validation"], scores["validation"],
                              params.gate.target_escape_rate, params.evaluate.threshold)
    threshold, review_band = chosen["threshold"], params.evaluate.review_band
    scored = {split: image_metrics(subset, scores[split], threshold, review_band) for split, subset in held_out.items()}
    write_plots(reports_dir, labels["validation"], scores["validation"], threshold, params.data.classes)
    kept = read_model_metadata(model_path)["training"].get("best_epoch")
    comparison = compare_with_kept_epoch(
        read_kept_epoch(reports_dir / "history.csv", kept), evaluated,
        params.evaluate.max_gap, params.evaluate.max_overfit,
    )
    result = {**scored, "threshold_source": chosen["source"], "kept_epoch_vs_evaluate": comparison,
              "model": model_record(model_path)}
    write_stage_report(reports_dir / "evaluation.json", result, {
        "validation": {key: scored["validation"][key] for key in (*KEY_METRICS, "review_rate", "auc", "threshold")},
        "test": {key: scored["test"][key] for key in KEY_METRICS},
        "validation_accuracy_gap": comparison["validation_accuracy_gap"],
    })
    validation = scored["validation"]
    report(
        f"validation accuracy {validation['accuracy']:.4f}, escape rate "
        f"{validation['escape_rate']:.4f}, overkill rate {validation['overkill_rate']:.4f}, review rate "
        f"{validation['review_rate']:.4f} at threshold {threshold:.4f} ({chosen['source']}); "
        f"evaluate vs epoch {comparison['kept_epoch']} gap {comparison['validation_accuracy_gap']:.4f}"
        + (" (FLAGGED: above evaluate.max_gap)" if comparison["validation_gap_flag"] else "")
        + (" (FLAGGED: overfit above evaluate.max_overfit)" if comparison["overfit_flag"] else "")
    )
    by_type = defect_type_lines(validation)
    report(f"validation escape rate 95 % upper bound {validation['escape_rate_upper95']:.4f}"
           + ("; by defect type: " + "; ".join(by_type) if by_type else ""))
    return result
