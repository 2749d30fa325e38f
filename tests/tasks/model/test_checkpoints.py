import pytest

from tasks.model.train import run_train
from tests.conftest import make_image_folder, tiny_params, write_manifest


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


def test_the_lowest_validation_loss_epoch_is_kept_and_patience_stops_training():
    import keras
    import numpy as np

    from tasks.model.checkpoints import best_epoch_keeper

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

    from tasks.model.checkpoints import best_epoch_keeper
    from tasks.model.history import kept_epoch

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


def test_the_weight_average_is_what_validation_sees_and_what_is_kept(tmp_path):
    import keras
    import numpy as np

    from tasks.model.checkpoints import Checkpoint, best_epoch_keeper

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")])
    dense = model.get_layer("dense")
    rows: list[dict[str, float]] = []
    checkpoint = Checkpoint(tmp_path / "checkpoint", "run")
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
    from tasks.model.history import kept_epoch, read_history

    data = make_image_folder(tmp_path / "data", per_class=24, seed=5)
    params = tiny_params(data, epochs=3, average_momentum=0.8)
    model_path, reports = tmp_path / "models" / "candidate.h5", tmp_path / "reports"
    summary = run_train(params, model_path, write_manifest(params, reports))
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
