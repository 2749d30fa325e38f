import csv
import json
import shutil
from collections import Counter

import pytest

from tasks.data.dataset import list_images, select
from tasks.inference.metrics import (
    escape_upper_bound,
)
from tasks.model.evaluate import compare_with_kept_epoch, run_evaluate
from tasks.params import replace
from tests.conftest import copy_with_defect_types, write_manifest


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


@pytest.mark.slow
def test_run_evaluate_reports_escapes_per_defect_type(trained_workspace, tmp_path):
    params = trained_workspace["params"]
    data = copy_with_defect_types(trained_workspace["data_dir"], tmp_path / "data")
    params = replace(params, data=replace(params.data, dir=str(data)))
    reports = tmp_path / "reports"
    shutil.copytree(trained_workspace["reports"], reports)
    run_evaluate(params, trained_workspace["model_path"], write_manifest(params, reports))
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


