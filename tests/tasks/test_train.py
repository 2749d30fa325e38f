import csv
import json

import h5py
import pytest

from tasks.dataset import DatasetError
from tasks.model import MAPPING_ATTR
from tasks.train import run_train
from tests.conftest import make_image_folder, tiny_params


@pytest.mark.slow
def test_run_train_writes_model_history_and_summary(trained_workspace):
    model_path, reports = trained_workspace["model_path"], trained_workspace["reports"]
    with h5py.File(model_path, "r") as handle:
        assert json.loads(handle.attrs[MAPPING_ATTR]) == {"GO": 0, "NG": 1}
        assert "model_weights" in handle
    with (reports / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    summary = json.loads((reports / "train.json").read_text())
    assert summary["epochs"] == 3
    assert summary["images"]["train"]["GO"] > 0 and summary["images"]["validation"]["NG"] > 0
    assert 0.0 <= summary["last_epoch"]["val_accuracy"] <= 1.0


def test_missing_class_folder_names_folder_and_writes_no_model(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, classes=("GO",))
    with pytest.raises(DatasetError, match=r"data/NG: class folder missing"):
        run_train(tiny_params(data), tmp_path / "models" / "c.h5", tmp_path / "reports")
    assert not (tmp_path / "models").exists()
