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


def kill_after_epoch(epoch: int):
    """A callback that stops training after ``epoch`` like a killed process."""
    import keras

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, index, logs=None):
            if index + 1 == epoch:
                raise KeyboardInterrupt

    return Kill()


@pytest.mark.slow
def test_killed_training_resumes_from_last_epoch(tmp_path):
    from tasks.dataset import list_images, select
    from tasks.train import train_model

    data = make_image_folder(tmp_path / "data", per_class=12)
    params = tiny_params(data, epochs=3)
    images = list_images(data, params.data)
    args = (select(images, "train"), select(images, "validation"), params.model, params.train)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_model(*args, checkpoint_dir=checkpoint, extra_callbacks=[kill_after_epoch(2)])
    assert (checkpoint / "history.jsonl").exists()
    messages = []
    _, history = train_model(*args, checkpoint_dir=checkpoint, report=messages.append)
    assert messages[0] == "resuming from the checkpoint after epoch 2"
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert len(messages) == 2  # the resume notice and epoch 3 only
    assert not checkpoint.exists()


@pytest.mark.slow
def test_checkpoint_of_other_params_is_discarded(tmp_path):
    from tasks.dataset import list_images, select
    from tasks.train import train_model

    data = make_image_folder(tmp_path / "data", per_class=12)
    images = list_images(data, tiny_params(data).data)
    split = (select(images, "train"), select(images, "validation"))
    checkpoint = tmp_path / "ckpt"
    first = tiny_params(data, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_model(*split, first.model, first.train, checkpoint_dir=checkpoint,
                    extra_callbacks=[kill_after_epoch(1)])
    other = tiny_params(data, epochs=2, learning_rate=0.01)
    _, history = train_model(*split, other.model, other.train, checkpoint_dir=checkpoint)
    assert [row["epoch"] for row in history] == [1, 2]
