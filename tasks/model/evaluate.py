"""The evaluate stage: score the candidate and compare it with the epoch it kept.

Training keeps the weights of one epoch (``tasks.model.history.kept_epoch``). Keras' logged
train accuracy for that epoch is an average over batches while the weights were still
moving (with dropout and augmentation on); ``model.evaluate`` scores the kept weights.
A large gap between the two on the validation split points at a preprocessing or
determinism bug, so it is reported and flagged.

The validation and test images are scored once; the scores, and the threshold chosen
from them, are the artifacts the gate decides on (tasks.inference.scores).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.dataset import SPLITS, make_dataset, require_split, select
from tasks.data.image_manifest import read_images
from tasks.durable import write_stage_report
from tasks.errors import FanaoiError
from tasks.inference.metrics import (
    KEY_METRICS,
    defect_type_lines,
    image_metrics,
    keras_loss_and_accuracy,
    roc_points,
)
from tasks.inference.model_file import load_model, model_params_from_file, read_model_metadata
from tasks.inference.scores import score_candidate
from tasks.model.history import read_history
from tasks.params import Params

log = logging.getLogger(__name__)


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
    """The evaluate stage: scores the manifest's held-out images once; writes scores.csv, the
    operating point the gate applies, reports/evaluation.json and the plot CSVs."""
    model_path, reports_dir = params.paths.chosen(model_path, reports_dir)
    model = load_model(model_path)
    model.compile(loss="binary_crossentropy", metrics=["accuracy"])
    model_params = model_params_from_file(model_path)  # color_mode auto was resolved in training
    images = read_images(reports_dir, params.data, params.paths.reports)
    splits = {split: select(images, split) for split in SPLITS}
    for split in ("train", "validation"):
        require_split(splits[split], split, params.data.dir)
    batch = params.evaluate.batch_size
    single_pass = make_dataset(splits["train"], model_params, batch, cache_max_mb=0)
    loss, accuracy = model.evaluate(single_pass, verbose=0, return_dict=False)
    candidate = score_candidate(model_path, images, reports_dir, params.evaluate, params.gate.target_escape_rate,
                                model=model)
    held_out, labels, scores = candidate["images"], candidate["labels"], candidate["scores"]
    evaluated = {"train": {"loss": float(loss), "accuracy": float(accuracy)},
                 "validation": keras_loss_and_accuracy(labels["validation"], scores["validation"])}
    threshold, review_band = candidate["point"]["threshold"], params.evaluate.review_band
    scored = {split: image_metrics(subset, scores[split], threshold, review_band) for split, subset in held_out.items()}
    write_plots(reports_dir, labels["validation"], scores["validation"], threshold, params.data.classes)
    kept = read_model_metadata(model_path)["training"].get("best_epoch")
    comparison = compare_with_kept_epoch(
        read_kept_epoch(reports_dir / "history.csv", kept), evaluated,
        params.evaluate.max_gap, params.evaluate.max_overfit,
    )
    result = {**scored, "threshold_source": candidate["point"]["source"], "kept_epoch_vs_evaluate": comparison,
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
        f"{validation['review_rate']:.4f} at threshold {threshold:.4f} ({candidate['point']['source']}); "
        f"evaluate vs epoch {comparison['kept_epoch']} gap {comparison['validation_accuracy_gap']:.4f}"
        + (" (FLAGGED: above evaluate.max_gap)" if comparison["validation_gap_flag"] else "")
        + (" (FLAGGED: overfit above evaluate.max_overfit)" if comparison["overfit_flag"] else "")
    )
    by_type = defect_type_lines(validation)
    report(f"validation escape rate 95 % upper bound {validation['escape_rate_upper95']:.4f}"
           + ("; by defect type: " + "; ".join(by_type) if by_type else ""))
    return result
