"""The decision rule and the AOI metrics every stage and consumer shares.

An *escape* is an NG part passed as GO (the costly error), an *overkill* is a GO part
rejected. The threshold rule (``verdicts``) and its calibration live here once: evaluate
chooses the threshold, the gate, predict, the service and explain apply it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.data.dataset import UNTYPED, LabeledImage, defect_types_of, labels_of


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
    """Accuracy, precision, recall, F1, escape and overkill rate, AUC, log loss and the confusion counts.

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
        # Threshold-free and unbounded below 1.0 accuracy: what the gate compares once accuracy saturates.
        "log_loss": float(np.mean(log_losses(labels, scores))) if len(labels) else 0.0,
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


# Keras clips probabilities to [epsilon, 1 - epsilon] before the log in binary cross-entropy.
_KERAS_EPSILON = 1e-7


def log_losses(labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each image, clipped as Keras clips it: the training loss, per image."""
    labels = np.asarray(labels, dtype=np.float64)
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), _KERAS_EPSILON, 1 - _KERAS_EPSILON)
    return -(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))


def keras_loss_and_accuracy(labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray
                            ) -> dict[str, float]:
    """What ``model.evaluate`` reports for a sigmoid model compiled with binary cross-entropy and
    accuracy, from its probabilities: the scoring pass the stage already made, not another one."""
    labels = np.asarray(labels, dtype=np.float64)
    if not len(labels):
        return {"loss": 0.0, "accuracy": 0.0}
    # Keras' binary accuracy counts a probability above 0.5 (strictly) as the positive class.
    accuracy = np.mean((np.asarray(probabilities) > 0.5) == (labels == 1))
    return {"loss": float(np.mean(log_losses(labels, probabilities))), "accuracy": float(accuracy)}
