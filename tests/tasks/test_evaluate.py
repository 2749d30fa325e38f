import json
import shutil

import numpy as np
import pytest

from tasks.evaluate import classification_metrics, compare_with_last_epoch, roc_auc, run_evaluate


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
