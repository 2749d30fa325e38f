import json
from pathlib import Path

import pytest

from tasks.model.train import run_train
from tasks.params import replace
from tasks.registry.warm_start import champion_warm_start
from tests.conftest import write_manifest
from tests.tasks.model.test_checkpoints import kill_after_epoch


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
    from tasks.model.train import train_model
    from tasks.registry.publish import build_card
    from tasks.registry.store import CHAMPION_MODEL
    from tests.tasks.champion_support import gate_candidate

    params = champion_project
    warm_start = champion_warm_start(params)
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
    summary = run_train(params, model_path, write_manifest(params, tmp_path / "reports"), warm_start=warm_start)
    expected = {"from": "champion", "version": "v0001", "sha256": warm_start.sha256}
    assert summary["init"] == expected
    assert json.loads((tmp_path / "reports" / "train-details.json").read_text())["init"] == expected
    assert read_model_metadata(model_path)["training"]["init"] == expected
    gate_result = gate_candidate(params, model_path, tmp_path / "reports", record=False)
    card = build_card("v0002", model_path, gate_result, params, repo_dir=tmp_path,
                      action="promote", reason=None)
    assert card["training"] == {"first_layer_init": "glorot_uniform", "init": expected,
                                "best_epoch": summary["kept_epoch"], "epochs_run": summary["epochs"]}


def test_warm_start_without_a_champion_names_the_file_and_the_fix(champion_project, tmp_path):
    from tasks.model.warm_start import WarmStartError

    params = replace(champion_project, registry=replace(
        champion_project.registry, dir=str(tmp_path / "empty")))
    with pytest.raises(WarmStartError, match=r"empty/champion.h5: .* no champion.*train.init_from: null"):
        champion_warm_start(params)
    assert not (tmp_path / "c.h5").exists()


def test_warm_start_with_other_shapes_names_the_weight(champion_project, tmp_path):
    from tasks.model.warm_start import WarmStartError

    params = replace(champion_project, model=replace(
        champion_project.model, conv_filters=(4, 16)))
    with pytest.raises(WarmStartError, match=r"champion.h5: champion v0001 has weight 0 .*\(3, 3, 3, 8\).*"
                                             r"\(3, 3, 3, 4\).*conv_filters"):
        run_train(params, tmp_path / "c.h5", write_manifest(params, tmp_path / "reports"),
                  warm_start=champion_warm_start(params))


def test_warm_start_refuses_a_champion_trained_without_the_standardization(champion_project, tmp_path):
    from tasks.model.warm_start import WarmStartError

    params = replace(champion_project, model=replace(champion_project.model, standardize=True))
    with pytest.raises(WarmStartError, match=r"champion v0001 has layers conv1, .*model params build "
                                             r"standardize_flatten, standardize, .*standardize"):
        run_train(params, tmp_path / "c.h5", write_manifest(params, tmp_path / "reports"),
                  warm_start=champion_warm_start(params))
    assert not (tmp_path / "c.h5").exists()


def test_warm_start_accepts_a_champion_that_differs_only_in_dropout(champion_project):
    """Dropout passes its input through at inference: the weights mean the same with or without it."""
    import numpy as np

    from tasks.data.dataset import list_images, resolve_color_mode
    from tasks.inference.model_file import load_model
    from tasks.model.network import build_model
    from tasks.model.warm_start import load_warm_start

    images = list_images(champion_project.data.dir, champion_project.data)
    model_params = resolve_color_mode(images, replace(champion_project.model, dropout=0.3))
    model = build_model(model_params, 0.001)
    warm_start = champion_warm_start(champion_project)
    load_warm_start(model, warm_start)
    for ours, theirs in zip(model.get_weights(), load_model(warm_start.path).get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_warm_started_run_never_resumes_a_random_init_checkpoint(champion_project):
    from tasks.data.dataset import list_images, select
    from tasks.model.train import train_model

    warm = replace(champion_project.train, epochs=2)
    images = list_images(champion_project.data.dir, champion_project.data)
    split = (select(images, "train"), select(images, "validation"))
    with pytest.raises(KeyboardInterrupt):
        train_model(*split, champion_project.model, replace(warm, init_from=None),
                    checkpoint_dir=Path(warm.checkpoint_dir), extra_callbacks=[kill_after_epoch(1)])
    messages = []
    _, history = train_model(*split, champion_project.model, warm, checkpoint_dir=Path(warm.checkpoint_dir),
                             report=messages.append, warm_start=champion_warm_start(champion_project))
    assert not any("resuming" in message for message in messages)
    assert messages[0].startswith("warm start from champion v0001")
    assert [row["epoch"] for row in history] == [1, 2]
