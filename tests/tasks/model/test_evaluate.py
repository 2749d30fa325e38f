import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from tasks.data.dataset import list_images, select
from tasks.model.evaluate import (
    REVIEW,
    calibrate_threshold,
    choose_threshold,
    classification_metrics,
    compare_with_kept_epoch,
    defect_type_lines,
    escape_bounds,
    escape_upper_bound,
    escapes_by_type,
    roc_auc,
    run_evaluate,
    verdicts,
)
from tasks.params import replace
from tests.conftest import copy_with_defect_types


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
    written = json.loads((reports / "evaluation-details.json").read_text())
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


@pytest.mark.parametrize(("escapes", "count", "upper"), [
    (0, 40, 1 - 0.025 ** (1 / 40)),  # 0.0881: zero escapes among 40 is not 0 %
    (0, 10, 1 - 0.025 ** (1 / 10)),  # 0.3085
    (39, 40, 0.975 ** (1 / 40)),  # all but one escaped: closed form as well
    (1, 10, 0.4450),  # Clopper and Pearson's tables / R binom.test(1, 10)
    (5, 10, 0.8129),
    (3, 3, 1.0),
    (0, 0, 1.0),  # no images: nothing is known
])
def test_escape_upper_bound_is_the_exact_clopper_pearson_limit(escapes, count, upper):
    assert escape_upper_bound(escapes, count) == pytest.approx(upper, abs=5e-5)


def test_escape_upper_bound_of_0_of_40_is_about_0_088():
    assert round(escape_upper_bound(0, 40), 3) == 0.088


def test_escapes_are_counted_per_defect_type():
    labels = [1, 1, 1, 1, 1, 1, 1, 0, 0]
    predicted = [0, 1, 1, 1, 0, 0, 1, 1, 0]
    types = ["crack", "crack", "crack", "blowhole", "blowhole", "untyped", "untyped", None, None]
    per_type = escapes_by_type(labels, predicted, types)
    assert list(per_type) == ["blowhole", "crack", "untyped"]  # sorted, GO (None) left out
    assert per_type["crack"] == {
        "count": 3, "escapes": 1, "escape_rate": pytest.approx(1 / 3),
        "escape_rate_upper95": pytest.approx(escape_upper_bound(1, 3)),
    }
    assert (per_type["blowhole"]["count"], per_type["blowhole"]["escapes"]) == (2, 1)
    assert (per_type["untyped"]["count"], per_type["untyped"]["escapes"]) == (2, 1)
    bounds = escape_bounds(labels, [0.1 if p == 0 else 0.9 for p in predicted], 0.5, types)
    assert bounds["defect_types"] == per_type
    assert bounds["escape_rate_upper95"] == pytest.approx(escape_upper_bound(3, 7))
    assert defect_type_lines(bounds)[1] == "crack: 1 of 3 escaped, 0.3333 (95 % upper 0.9057)"
    flat = escape_bounds(labels, [0.1 if p == 0 else 0.9 for p in predicted], 0.5,
                         ["untyped" if t else None for t in types])
    assert defect_type_lines(flat) == []  # no NG subfolders: the overall rate says it all


@pytest.mark.slow
def test_run_evaluate_reports_escapes_per_defect_type(trained_workspace, tmp_path):
    params = trained_workspace["params"]
    data = copy_with_defect_types(trained_workspace["data_dir"], tmp_path / "data")
    params = replace(params, data=replace(params.data, dir=str(data)))
    reports = tmp_path / "reports"
    shutil.copytree(trained_workspace["reports"], reports)
    run_evaluate(params, trained_workspace["model_path"], reports)
    written = json.loads((reports / "evaluation-details.json").read_text())
    assert set(written["validation"]["defect_types"]) == {"crack", "blowhole", "untyped"}
    for split in ("validation", "test"):
        expected = Counter(image.defect_type for image in select(list_images(data, params.data), split)
                           if image.defect_type)
        scored = written[split]
        # A type with no image in a split is left out of it, not reported as 0 of 0.
        assert {kind: row["count"] for kind, row in scored["defect_types"].items()} == expected
        assert sum(row["escapes"] for row in scored["defect_types"].values()) == scored["confusion"]["fn"]
        assert scored["escape_rate_upper95"] == pytest.approx(
            escape_upper_bound(scored["confusion"]["fn"], scored["confusion"]["fn"] + scored["confusion"]["tp"]))
        assert all(row["escape_rate"] <= row["escape_rate_upper95"] <= 1 for row in scored["defect_types"].values())


def test_calibrated_threshold_meets_the_target_with_least_overkill_midway_in_its_gap():
    labels = np.array([1] * 10 + [0] * 4)
    scores = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.01, 0.1, 0.25, 0.6])
    # 0.2 of 11 ranks: a new NG part falls below the 2nd lowest NG score with chance 2/11,
    # below the 3rd with 3/11 > 0.2, so 1 of these 10 may escape, not 2.
    threshold = calibrate_threshold(labels, scores, target_escape_rate=0.2)
    assert threshold == pytest.approx((0.1 + 0.2) / 2)  # between the GO at 0.1 and the NG at 0.2
    assert np.sum((scores < threshold) & (labels == 1)) == 1
    assert np.sum((scores >= threshold) & (labels == 0)) == 2  # as few as at 0.2, the highest allowed
    assert calibrate_threshold(labels, scores, 0.3) == pytest.approx((0.25 + 0.3) / 2)  # 3/11 <= 0.3: 2 escape
    assert calibrate_threshold(labels, scores, 0.0) == pytest.approx((0.01 + 0.05) / 2)


def test_calibrated_threshold_lets_through_one_validation_escape_per_target_of_new_parts():
    # 0.005: one of 233 NG images escaping would leave a new NG part 2/234 = 0.85 % to escape.
    for count, allowed in ((199, 0), (233, 0), (398, 0), (399, 1), (599, 2)):
        ng_scores = np.linspace(0.5, 1.0, count)
        labels = np.array([1] * count + [0] * count)
        scores = np.concatenate([ng_scores, ng_scores - 1e-4])  # a GO part right under each NG
        threshold = calibrate_threshold(labels, scores, 0.005)
        assert np.sum((scores < threshold) & (labels == 1)) == allowed, count


def test_separated_scores_get_a_threshold_with_margin_on_both_sides():
    labels = np.array([1] * 5 + [0] * 5)
    scores = np.array([0.97, 0.98, 0.99, 0.995, 0.999, 0.001, 0.01, 0.02, 0.03, 0.04])
    assert calibrate_threshold(labels, scores, 0.0) == pytest.approx((0.04 + 0.97) / 2)


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
