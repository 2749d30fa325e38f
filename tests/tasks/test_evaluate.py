import csv
import json
import shutil

import numpy as np
import pytest

from tasks.evaluate import (
    REVIEW,
    calibrate_threshold,
    choose_threshold,
    classification_metrics,
    compare_with_kept_epoch,
    roc_auc,
    run_evaluate,
    verdicts,
)


def test_escape_and_overkill_follow_aoi_meaning():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]  # NG = 1
    scores = [0.9, 0.8, 0.2, 0.1, 0.1, 0.2, 0.3, 0.7]
    metrics = classification_metrics(labels, scores, threshold=0.5)
    assert metrics["confusion"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 2}
    assert metrics["escape_rate"] == pytest.approx(0.5)  # 2 of 4 NG passed as GO
    assert metrics["overkill_rate"] == pytest.approx(0.25)  # 1 of 4 GO rejected
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx(1 - (0.5 + 0.25) / 2)


def test_threshold_moves_decisions():
    metrics = classification_metrics([1, 0], [0.4, 0.3], threshold=0.35)
    assert metrics["confusion"] == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(labels, scores) == pytest.approx(pairwise)


def test_gaps_are_flagged_above_limits():
    last = {"epoch": 3, "accuracy": 0.90, "loss": 0.3, "val_accuracy": 0.95, "val_loss": 0.2}
    evaluated = {"train": {"accuracy": 0.99, "loss": 0.05}, "validation": {"accuracy": 0.80, "loss": 0.5}}
    result = compare_with_kept_epoch(last, evaluated, max_gap=0.02, max_overfit=0.05)
    assert result["validation_accuracy_gap"] == pytest.approx(0.15)
    assert result["train_validation_gap"] == pytest.approx(0.19)
    assert result["validation_gap_flag"] and result["overfit_flag"]
    calm = compare_with_kept_epoch(last, evaluated, max_gap=0.2, max_overfit=0.2)
    assert not calm["validation_gap_flag"] and not calm["overfit_flag"]


@pytest.mark.slow
def test_run_evaluate_reports_both_views(trained_workspace, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(trained_workspace["reports"], reports)
    result = run_evaluate(trained_workspace["params"], trained_workspace["model_path"], reports)
    written = json.loads((reports / "evaluation.json").read_text())
    assert written["validation"]["count"] == result["validation"]["count"] > 0
    comparison = written["kept_epoch_vs_evaluate"]
    summary = trained_workspace["summary"]
    history = list(csv.DictReader((reports / "history.csv").open()))
    lowest = min(history, key=lambda row: float(row["val_loss"]))
    assert comparison["kept_epoch"] == summary["kept_epoch"] == int(lowest["epoch"])
    kept = summary["kept_epoch_metrics"]
    assert comparison["kept_epoch_validation_accuracy"] == pytest.approx(kept["val_accuracy"], abs=1e-5)
    # evaluate() scores the kept weights: it reproduces that epoch's logged validation numbers
    assert comparison["evaluate_validation_loss"] == pytest.approx(float(lowest["val_loss"]), abs=1e-4)
    assert comparison["evaluate_validation_accuracy"] == pytest.approx(float(lowest["val_accuracy"]), abs=1e-6)
    assert 0 <= comparison["evaluate_validation_accuracy"] <= 1
    assert (reports / "plots" / "confusion.csv").read_text().startswith("actual,predicted")
    assert (reports / "plots" / "roc.csv").exists()
    assert written["model"] == {
        "first_layer_init": "glorot_uniform", "init": {"from": "random"}, "pruned": None,
        "best_epoch": summary["kept_epoch"], "epochs_run": 3,
    }


def test_calibrated_threshold_is_the_highest_that_meets_the_target():
    labels = np.array([1] * 10 + [0] * 4)
    scores = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.01, 0.1, 0.25, 0.6])
    threshold = calibrate_threshold(labels, scores, target_escape_rate=0.2)  # 2 of 10 may escape
    assert threshold == pytest.approx(0.3)
    escapes = np.sum((scores < threshold) & (labels == 1))
    assert escapes == 2
    assert np.sum((scores < np.nextafter(threshold, 1)) & (labels == 1)) == 3  # any higher: too many
    assert calibrate_threshold(labels, scores, 0.0) == pytest.approx(0.05)


def test_threshold_is_calibrated_only_with_enough_defects_to_measure_the_target():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 250 + [0] * 250)
    scores = np.where(labels == 1, rng.uniform(0.2, 1.0, 500), rng.uniform(0.0, 0.6, 500))
    chosen = choose_threshold(labels, scores, target_escape_rate=0.005, default=0.5)
    assert chosen["source"].startswith("calibrated on 250 validation NG images")
    assert np.sum((scores < chosen["threshold"]) & (labels == 1)) <= 1  # 0.5 % of 250
    few = choose_threshold(labels[150:], scores[150:], target_escape_rate=0.005, default=0.5)
    assert few["threshold"] == 0.5
    assert "validation holds 100 NG images, fewer than the 200" in few["source"]
    assert choose_threshold(labels, scores, None, 0.4) == {
        "threshold": 0.4, "source": "evaluate.threshold (gate.target_escape_rate is null)"}


def test_review_band_takes_parts_out_of_the_automatic_decision():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.95, 0.45, 0.2, 0.55, 0.3, 0.05])
    assert verdicts(scores, 0.5, (0.25, 0.6)).tolist() == [1, REVIEW, 0, REVIEW, REVIEW, 0]
    metrics = classification_metrics(labels, scores, 0.5, review_band=(0.25, 0.6))
    assert metrics["escape_rate"] == pytest.approx(2 / 3)  # the band does not change these
    assert metrics["overkill_rate"] == pytest.approx(1 / 3)
    assert metrics["review_rate"] == pytest.approx(3 / 6)
    assert metrics["escape_rate_after_review"] == pytest.approx(1 / 3)  # only 0.2 passes unseen
    assert metrics["overkill_rate_after_review"] == 0.0
    plain = classification_metrics(labels, scores, 0.5)
    assert plain["review_rate"] == 0.0 and plain["escape_rate_after_review"] == plain["escape_rate"]
