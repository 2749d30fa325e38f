import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from tasks.dataset import list_images, select
from tasks.evaluate import (
    classification_metrics,
    compare_with_last_epoch,
    defect_type_lines,
    escape_bounds,
    escape_upper_bound,
    escapes_by_type,
    roc_auc,
    run_evaluate,
)
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
    last = {"accuracy": 0.90, "loss": 0.3, "val_accuracy": 0.95, "val_loss": 0.2}
    evaluated = {"train": {"accuracy": 0.99, "loss": 0.05}, "validation": {"accuracy": 0.80, "loss": 0.5}}
    result = compare_with_last_epoch(last, evaluated, max_gap=0.02, max_overfit=0.05)
    assert result["validation_accuracy_gap"] == pytest.approx(0.15)
    assert result["train_validation_gap"] == pytest.approx(0.19)
    assert result["validation_gap_flag"] and result["overfit_flag"]
    calm = compare_with_last_epoch(last, evaluated, max_gap=0.2, max_overfit=0.2)
    assert not calm["validation_gap_flag"] and not calm["overfit_flag"]


@pytest.mark.slow
def test_run_evaluate_reports_both_views(trained_workspace, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(trained_workspace["reports"], reports)
    result = run_evaluate(trained_workspace["params"], trained_workspace["model_path"], reports)
    written = json.loads((reports / "evaluation.json").read_text())
    assert written["validation"]["count"] == result["validation"]["count"] > 0
    comparison = written["last_epoch_vs_evaluate"]
    history_last = trained_workspace["summary"]["last_epoch"]
    assert comparison["last_epoch_validation_accuracy"] == pytest.approx(history_last["val_accuracy"], abs=1e-5)
    assert 0 <= comparison["evaluate_validation_accuracy"] <= 1
    assert (reports / "plots" / "confusion.csv").read_text().startswith("actual,predicted")
    assert (reports / "plots" / "roc.csv").exists()
    assert written["model"] == {
        "first_layer_init": "glorot_uniform", "init": {"from": "random"}, "pruned": None,
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


@pytest.mark.slow
def test_run_evaluate_reports_escapes_per_defect_type(trained_workspace, tmp_path):
    params = trained_workspace["params"]
    data = copy_with_defect_types(trained_workspace["data_dir"], tmp_path / "data")
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, dir=str(data)))
    reports = tmp_path / "reports"
    shutil.copytree(trained_workspace["reports"], reports)
    run_evaluate(params, trained_workspace["model_path"], reports)
    written = json.loads((reports / "evaluation.json").read_text())
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
