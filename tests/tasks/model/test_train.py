import csv
import json
from pathlib import Path

import h5py
import pytest

from tasks.data.dataset import DatasetError
from tasks.inference.model_file import MAPPING_ATTR
from tasks.model.train import run_train
from tasks.params import replace
from tests.conftest import BASE, make_image_folder, tiny_params


@pytest.mark.slow
def test_run_train_writes_model_history_and_summary(trained_workspace):
    model_path, reports = trained_workspace["model_path"], trained_workspace["reports"]
    with h5py.File(model_path, "r") as handle:
        assert json.loads(handle.attrs[MAPPING_ATTR]) == {"GO": 0, "NG": 1}
        assert "model_weights" in handle
    with (reports / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    summary = json.loads((reports / "train-details.json").read_text())
    assert summary["epochs"] == 3
    assert summary["images"]["train"]["GO"] > 0 and summary["images"]["validation"]["NG"] > 0
    assert 0.0 <= summary["kept_epoch_metrics"]["val_accuracy"] <= 1.0


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
    from tasks.data.dataset import list_images, select
    from tasks.model.train import train_model

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
    from tasks.data.dataset import list_images, select
    from tasks.model.train import train_model

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


def first_layer_at_start(weights: list):
    """A callback that keeps the first layer's kernel as it is when fit() begins."""
    import keras

    class Capture(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            weights.append(self.model.layers[0].get_weights()[0])

    return Capture()


@pytest.fixture
def champion_project(trained_workspace, tmp_path_factory, tmp_path):
    """Tiny params with train.init_from: champion over a registry whose champion is v0001."""
    from tests.tasks.champion_support import copy_registry, gate_params, one_version_registry

    data_dir = trained_workspace["data_dir"]
    source = one_version_registry(data_dir, tmp_path_factory.getbasetemp())
    registry = copy_registry(source, tmp_path / "registry")
    params = gate_params(data_dir, registry)
    train = replace(
        params.train, epochs=1, init_from="champion", checkpoint_dir=str(tmp_path / "ckpt")
    )
    return replace(params, train=train)


@pytest.mark.slow
def test_warm_start_begins_at_the_champion_weights_and_is_recorded(champion_project, tmp_path):
    import numpy as np

    from tasks.data.dataset import list_images, select
    from tasks.inference.model_file import load_model, read_model_metadata
    from tasks.model.train import find_warm_start, train_model
    from tasks.registry.gate import run_gate
    from tasks.registry.publish import build_card
    from tasks.registry.store import CHAMPION_MODEL

    params = champion_project
    warm_start = find_warm_start(params)
    assert warm_start.version == "v0001"
    champion = load_model(Path(params.registry.dir) / CHAMPION_MODEL).layers[0].get_weights()[0]
    images = list_images(params.data.dir, params.data)
    split = (select(images, "train"), select(images, "validation"))
    seen = []
    train_model(*split, params.model, params.train, warm_start=warm_start,
                extra_callbacks=[first_layer_at_start(seen)])
    np.testing.assert_array_equal(seen[0], champion)
    random_start = []
    train_model(*split, params.model, replace(params.train, init_from=None),
                extra_callbacks=[first_layer_at_start(random_start)])
    assert not np.allclose(random_start[0], champion)

    model_path = tmp_path / "candidate.h5"
    summary = run_train(params, model_path, tmp_path / "reports")
    expected = {"from": "champion", "version": "v0001", "sha256": warm_start.sha256}
    assert summary["init"] == expected
    assert json.loads((tmp_path / "reports" / "train-details.json").read_text())["init"] == expected
    assert read_model_metadata(model_path)["training"]["init"] == expected
    gate_result = run_gate(params, model_path, tmp_path / "reports", record=False)
    card = build_card("v0002", model_path, gate_result, params, repo_dir=tmp_path,
                      action="promote", reason=None)
    assert card["training"] == {"first_layer_init": "glorot_uniform", "init": expected,
                                "best_epoch": summary["kept_epoch"], "epochs_run": summary["epochs"]}


def test_warm_start_without_a_champion_names_the_file_and_the_fix(champion_project, tmp_path):
    from tasks.model.train import WarmStartError

    params = replace(champion_project, registry=replace(
        champion_project.registry, dir=str(tmp_path / "empty")))
    with pytest.raises(WarmStartError, match=r"empty/champion.h5: .* no champion.*train.init_from: null"):
        run_train(params, tmp_path / "c.h5", tmp_path / "reports")
    assert not (tmp_path / "c.h5").exists()


def test_warm_start_with_other_shapes_names_the_weight(champion_project, tmp_path):
    from tasks.model.train import WarmStartError

    params = replace(champion_project, model=replace(
        champion_project.model, conv_filters=(4, 16)))
    with pytest.raises(WarmStartError, match=r"champion.h5: champion v0001 has weight 0 .*\(3, 3, 3, 8\).*"
                                             r"\(3, 3, 3, 4\).*conv_filters"):
        run_train(params, tmp_path / "c.h5", tmp_path / "reports")


def test_warm_start_refuses_a_champion_trained_without_the_standardization(champion_project, tmp_path):
    from tasks.model.train import WarmStartError

    params = replace(champion_project, model=replace(champion_project.model, standardize=True))
    with pytest.raises(WarmStartError, match=r"champion v0001 has layers conv1, .*model params build "
                                             r"standardize_flatten, standardize, .*standardize"):
        run_train(params, tmp_path / "c.h5", tmp_path / "reports")
    assert not (tmp_path / "c.h5").exists()


def test_warm_start_accepts_a_champion_that_differs_only_in_dropout(champion_project):
    """Dropout passes its input through at inference: the weights mean the same with or without it."""
    import numpy as np

    from tasks.data.dataset import list_images, resolve_color_mode
    from tasks.inference.model_file import load_model
    from tasks.model.network import build_model
    from tasks.model.train import find_warm_start, load_warm_start

    images = list_images(champion_project.data.dir, champion_project.data)
    model_params = resolve_color_mode(images, replace(champion_project.model, dropout=0.3))
    model = build_model(model_params, 0.001)
    warm_start = find_warm_start(champion_project)
    load_warm_start(model, warm_start)
    for ours, theirs in zip(model.get_weights(), load_model(warm_start.path).get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_warm_started_run_never_resumes_a_random_init_checkpoint(champion_project):
    from tasks.data.dataset import list_images, select
    from tasks.model.train import find_warm_start, train_model

    warm = replace(champion_project.train, epochs=2)
    images = list_images(champion_project.data.dir, champion_project.data)
    split = (select(images, "train"), select(images, "validation"))
    with pytest.raises(KeyboardInterrupt):
        train_model(*split, champion_project.model, replace(warm, init_from=None),
                    checkpoint_dir=Path(warm.checkpoint_dir), extra_callbacks=[kill_after_epoch(1)])
    messages = []
    _, history = train_model(*split, champion_project.model, warm, checkpoint_dir=Path(warm.checkpoint_dir),
                             report=messages.append, warm_start=find_warm_start(champion_project))
    assert not any("resuming" in message for message in messages)
    assert messages[0].startswith("warm start from champion v0001")
    assert [row["epoch"] for row in history] == [1, 2]


def test_the_lowest_validation_loss_epoch_is_kept_and_patience_stops_training():
    import keras
    import numpy as np

    from tasks.model.train import best_epoch_keeper

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")])
    rows: list[dict[str, float]] = []
    keeper = best_epoch_keeper(2, rows, checkpoint=None)
    keeper.set_model(model)
    model.stop_training = False  # as fit() sets it
    keeper.on_train_begin()
    for epoch, val_loss in enumerate([0.5, 0.3, 0.4, 0.45, 0.1]):
        model.get_layer("dense").set_weights([np.full((1, 1), epoch + 1.0), np.zeros(1)])
        rows.append({"epoch": epoch + 1, "val_loss": val_loss})
        keeper.on_epoch_end(epoch)
        if model.stop_training:
            break
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]  # two epochs without a better loss
    keeper.on_train_end()
    assert model.get_layer("dense").get_weights()[0][0, 0] == 2.0  # epoch 2's weights


def test_the_latest_epoch_within_the_tolerance_is_kept_and_patience_counts_from_the_lowest():
    import keras
    import numpy as np

    from tasks.model.train import best_epoch_keeper, kept_epoch

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")])
    rows: list[dict[str, float]] = []
    keeper = best_epoch_keeper(3, rows, checkpoint=None, tolerance=0.02)
    keeper.set_model(model)
    model.stop_training = False
    keeper.on_train_begin()
    # 2 is the lowest; 3 ties with it within 0.02; 4 does not; 5 does again; 6 would be
    # within too, but patience (3 epochs from the lowest, epoch 2) stops after 5.
    losses = [0.50, 0.30, 0.31, 0.35, 0.315, 0.30]
    for epoch, val_loss in enumerate(losses):
        model.get_layer("dense").set_weights([np.full((1, 1), epoch + 1.0), np.zeros(1)])
        rows.append({"epoch": epoch + 1, "val_loss": val_loss})
        keeper.on_epoch_end(epoch)
        if model.stop_training:
            break
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    keeper.on_train_end()
    assert model.get_layer("dense").get_weights()[0][0, 0] == 5.0
    assert kept_epoch(rows, 0.02)["epoch"] == 5
    assert kept_epoch(rows, 0.0)["epoch"] == 2
    assert kept_epoch(rows, 0.012)["epoch"] == 3


def test_a_new_lowest_loss_moves_the_tolerance_band():
    from tasks.model.train import kept_epoch

    rows = [{"epoch": 1, "val_loss": 0.30}, {"epoch": 2, "val_loss": 0.31}, {"epoch": 3, "val_loss": 0.10},
            {"epoch": 4, "val_loss": 0.29}]
    assert kept_epoch(rows, 0.02)["epoch"] == 3  # epoch 4 was within 0.02 of the lowest before epoch 3 only
    assert kept_epoch(rows, 0.2)["epoch"] == 4


def test_the_weight_average_is_what_validation_sees_and_what_is_kept(tmp_path):
    import keras
    import numpy as np

    from tasks.model.train import _Checkpoint, best_epoch_keeper

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")])
    dense = model.get_layer("dense")
    rows: list[dict[str, float]] = []
    checkpoint = _Checkpoint(tmp_path / "checkpoint", "run")
    keeper = best_epoch_keeper(None, rows, checkpoint, average_momentum=0.5)
    keeper.set_model(model)
    model.stop_training = False
    keeper.on_train_begin()
    for value in [4.0, 8.0]:  # two train steps; the average: 4, then 0.5 * 4 + 0.5 * 8
        dense.set_weights([np.full((1, 1), value), np.zeros(1)])
        keeper.average.blend()
    keeper.on_test_begin()
    assert dense.get_weights()[0][0, 0] == 6.0  # validation scores the average
    keeper.on_test_end()
    assert dense.get_weights()[0][0, 0] == 8.0  # training goes on from its own weights
    rows.append({"epoch": 1, "val_loss": 0.2})
    keeper.on_epoch_end(0)
    assert dense.get_weights()[0][0, 0] == 8.0

    dense.set_weights([np.full((1, 1), 100.0), np.zeros(1)])  # a kill; the resumed run:
    resumed = best_epoch_keeper(None, rows, checkpoint, average_momentum=0.5)
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.average.blend()
    resumed.on_test_begin()
    assert dense.get_weights()[0][0, 0] == 53.0  # the saved average 6 carried on, not restarted
    resumed.on_test_end()
    rows.append({"epoch": 2, "val_loss": 0.3})
    resumed.on_epoch_end(1)
    resumed.on_train_end()
    assert dense.get_weights()[0][0, 0] == 6.0  # epoch 1's average: the lowest validation loss


@pytest.mark.slow
def test_an_averaged_run_saves_the_weights_its_kept_epoch_was_validated_with(tmp_path):
    from tasks.model.evaluate import run_evaluate
    from tasks.model.train import kept_epoch, read_history

    data = make_image_folder(tmp_path / "data", per_class=24, seed=5)
    params = tiny_params(data, epochs=3, average_momentum=0.8)
    model_path, reports = tmp_path / "models" / "candidate.h5", tmp_path / "reports"
    summary = run_train(params, model_path, reports)
    kept = kept_epoch(read_history(reports / "history.csv"), params.train.keep_tolerance)
    assert summary["kept_epoch"] == int(kept["epoch"])
    comparison = run_evaluate(params, model_path, reports)["kept_epoch_vs_evaluate"]
    assert comparison["evaluate_validation_loss"] == pytest.approx(kept["val_loss"], abs=1e-4)
    assert comparison["evaluate_validation_accuracy"] == pytest.approx(kept["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_the_weight_average_is_taken_every_step_however_many_steps_a_call_runs(tmp_path):
    import numpy as np

    from tasks.data.dataset import list_images, select
    from tasks.model.train import train_model

    data = make_image_folder(tmp_path / "data", per_class=16, seed=7)
    kept = []
    for steps in (1, 3):  # 3: Keras calls batch-end callbacks every third step
        params = tiny_params(data, epochs=2, batch_size=4, average_momentum=0.8, steps_per_execution=steps)
        images = list_images(data, params.data)
        model, _ = train_model(select(images, "train"), select(images, "validation"), params.model, params.train)
        kept.append(model.get_weights())
    for one_step, three_steps in zip(*kept, strict=True):
        np.testing.assert_allclose(three_steps, one_step, rtol=1e-4, atol=1e-6)


def test_learning_rate_follows_a_cosine_from_the_base_rate():
    from tasks.model.train import learning_rate_at

    cosine = replace(BASE.train, epochs=10, learning_rate=0.01, lr_schedule="cosine")
    assert learning_rate_at(0, cosine) == pytest.approx(0.01)
    assert learning_rate_at(5, cosine) == pytest.approx(0.005)
    assert learning_rate_at(9, cosine) < 0.0003
    assert learning_rate_at(7, replace(BASE.train, learning_rate=0.01)) == 0.01


def test_balanced_class_weights_count_each_class_equally(tmp_path):
    from tasks.data.dataset import LabeledImage
    from tasks.model.train import class_weights

    images = [LabeledImage(tmp_path / f"{i}.png", "NG" if i < 2 else "GO", int(i < 2), str(i), "train")
              for i in range(8)]
    weights = class_weights(images, "balanced")
    assert weights == {0: pytest.approx(8 / 12), 1: pytest.approx(2.0)}
    assert 6 * weights[0] == pytest.approx(2 * weights[1])
    assert class_weights(images, "none") is None


@pytest.mark.slow
def test_aoi_cnn_trains_with_augmentation_and_its_h5_answers_like_the_model(tmp_path):
    import numpy as np

    from tasks.data.dataset import decode_all, list_images, select
    from tasks.inference.model_file import load_model

    data = make_image_folder(tmp_path / "data", per_class=16)
    base = tiny_params(data, epochs=2)
    augment = replace(BASE.train.augment, flip=True, rot90=True, shift=0.1, brightness=0.1, contrast=0.1)
    params = replace(
        base,
        model=replace(BASE.model, architecture="aoi_cnn", input_size=(32, 32), color_mode="auto",
                          conv_filters=(4, 8), stem_stride=2, dropout=0.2),
        train=replace(base.train, augment=augment, class_weight="balanced",
                                  lr_schedule="cosine", early_stopping_patience=1),
    )
    summary = run_train(params, tmp_path / "candidate.h5", tmp_path / "reports")
    assert summary["color_mode"] == "rgb"  # the tiny fans are saved as RGB
    loaded = load_model(tmp_path / "candidate.h5")
    assert not [layer.name for layer in loaded.layers if "random" in type(layer).__name__.lower()]
    images = select(list_images(data, params.data), "validation")
    pixels = decode_all(images, replace(params.model, color_mode="rgb"))
    first, second = loaded.predict(pixels, verbose=0), loaded.predict(pixels, verbose=0)
    np.testing.assert_array_equal(first, second)  # no dropout, no augmentation at inference


@pytest.mark.slow
def test_splits_past_cache_max_mb_train_from_files_under_the_cache_dir_as_from_memory(tmp_path):
    from tasks.data.dataset import PIXEL_CACHE_FOLDER
    from tasks.model.train import read_history

    data = make_image_folder(tmp_path / "data", per_class=16, seed=4)
    in_memory = tiny_params(data)
    from_files = replace(in_memory, train=replace(in_memory.train, cache_max_mb=0.001),
                         validate=replace(in_memory.validate, cache_dir=str(tmp_path / "cache")))
    run_train(in_memory, tmp_path / "memory.h5", tmp_path / "memory")
    run_train(from_files, tmp_path / "files.h5", tmp_path / "files")
    cached = sorted(path.name.split("-")[0] for path in (tmp_path / "cache" / PIXEL_CACHE_FOLDER).glob("*.u8"))
    assert cached == ["train", "validation"]
    for files, memory in zip(read_history(tmp_path / "files" / "history.csv"),
                             read_history(tmp_path / "memory" / "history.csv"), strict=True):
        assert files == pytest.approx(memory, rel=1e-5)  # the same batches in the same order
