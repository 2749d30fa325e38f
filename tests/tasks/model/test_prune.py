import json
import shutil

import numpy as np
import pytest

from tasks.inference.model_file import load_model, read_model_metadata
from tasks.model.network import build_model
from tasks.model.prune import PruneError, filter_norms, prune_model, run_prune
from tasks.params import replace
from tests.conftest import BASE, TINY_SIZE


@pytest.fixture
def trained(trained_workspace):
    return load_model(trained_workspace["model_path"])


def sample_images(seed: int = 0, count: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (count, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)


def conv_layers(model):
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_pruning_reduces_parameters_and_removes_the_lowest_l1_filters(trained):
    pruned, plan = prune_model(trained, 0.5)
    assert pruned.count_params() < trained.count_params()
    assert [(row["filters_before"], row["filters_after"]) for row in plan] == [(8, 4), (16, 8)]
    for row, original in zip(plan, conv_layers(trained), strict=True):
        norms = filter_norms(original.get_weights()[0])
        assert sorted(row["removed"]) == sorted(np.argsort(norms)[: len(row["removed"])].tolist())
        assert max(norms[row["removed"]]) <= row["kept_min_l1"] == min(np.delete(norms, row["removed"]))


def test_fraction_zero_rebuild_predicts_exactly_like_the_original(trained):
    rebuilt, plan = prune_model(trained, 0.0)
    assert all(row["removed"] == [] for row in plan)
    assert rebuilt.count_params() == trained.count_params()
    images = sample_images()
    np.testing.assert_allclose(rebuilt.predict(images, verbose=0), trained.predict(images, verbose=0), atol=1e-6)


def test_pruning_filters_that_output_nothing_keeps_the_predictions(tiny_data_params):
    """Zeroed filters are the weakest, and removing them must not change any output: this
    checks the slicing of the next Conv2D and of the Dense rows after Flatten (HWC order)."""
    import keras

    keras.utils.set_random_seed(5)
    model = build_model(tiny_data_params.model, 0.001)
    silenced = {}
    for layer, indices in zip(conv_layers(model), ([1, 6], [0, 3, 9, 15]), strict=True):
        kernel, bias = layer.get_weights()
        kernel[..., indices], bias[indices] = 0.0, 0.0
        layer.set_weights([kernel, bias])
        silenced[layer.name] = indices
    pruned, plan = prune_model(model, 0.25)
    assert {row["layer"]: sorted(row["removed"]) for row in plan} == silenced
    images = sample_images(seed=1)
    np.testing.assert_allclose(pruned.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_a_layer_that_cannot_be_pruned_through_is_named():
    import keras

    model = keras.Sequential([
        keras.Input((TINY_SIZE, TINY_SIZE, 3)), keras.layers.Conv2D(4, 3),
        keras.layers.LayerNormalization(name="ln"), keras.layers.Flatten(), keras.layers.Dense(1),
    ])
    with pytest.raises(PruneError, match=r"cannot prune through layer ln \(LayerNormalization\)"):
        prune_model(model, 0.5)


def test_pruning_aoi_cnn_slices_batch_norm_with_its_conv(tiny_data_params):
    """Silenced channels (zero kernel, zero BatchNorm scale and shift) output exactly 0, so
    removing them must not change any output of a Conv-BN-ReLU, global-pooling model."""
    import keras


    keras.utils.set_random_seed(5)
    params = replace(BASE.model, architecture="aoi_cnn", input_size=(TINY_SIZE, TINY_SIZE), conv_filters=(8, 16),
                     pooling="max", standardize=True)
    model = build_model(params, 0.001)
    silenced = {}
    for layer, indices in zip(conv_layers(model), ([1, 6], [0, 3, 9, 15]), strict=True):
        (kernel,) = layer.get_weights()
        kernel[..., indices] = 0.0
        layer.set_weights([kernel])
        norm = model.get_layer(layer.name.replace("conv", "bn"))
        gamma, beta, mean, variance = norm.get_weights()
        gamma[indices], beta[indices] = 0.0, 0.0
        norm.set_weights([gamma, beta, mean + 0.1, variance * 2])  # inference uses these
        silenced[layer.name] = indices
    pruned, plan = prune_model(model, 0.25)
    assert {row["layer"]: sorted(row["removed"]) for row in plan} == silenced
    assert [layer.filters for layer in conv_layers(pruned)] == [6, 12]
    images = sample_images(seed=1)
    np.testing.assert_allclose(pruned.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


@pytest.fixture
def tiny_data_params(trained_workspace):
    params = trained_workspace["params"]
    return replace(params, prune=replace(BASE.prune, fine_tune_epochs=1, speed_images=32))


@pytest.mark.slow
def test_run_prune_writes_a_loadable_candidate_and_the_report(trained_workspace, tiny_data_params, tmp_path):
    source = shutil.copy(trained_workspace["model_path"], tmp_path / "candidate.h5")
    out = tmp_path / "pruned" / "candidate.h5"
    result = run_prune(tiny_data_params, source, out, tmp_path / "reports", fraction=0.5)
    written = json.loads((tmp_path / "reports" / "prune.json").read_text())
    assert written == json.loads(json.dumps(result))
    before, after = written["before"], written["after"]
    assert after["parameters"] < before["parameters"]
    assert after["file_bytes"] == out.stat().st_size < before["file_bytes"]
    assert after["images_per_second"] > 0 and 0 <= after["validation_accuracy"] <= 1
    assert [row["epoch"] for row in written["fine_tune_history"]] == [1]
    pruned = load_model(out)
    assert [layer.filters for layer in conv_layers(pruned)] == [4, 8]
    metadata = read_model_metadata(out)
    assert metadata["class_mapping"] == {"GO": 0, "NG": 1}
    assert metadata["preprocessing"] == read_model_metadata(source)["preprocessing"]
    record = metadata["training"]
    assert record["init"] == {"from": "random"} and record["first_layer_init"] == "glorot_uniform"
    assert record["pruned"]["fraction"] == 0.5
    assert record["pruned"]["filters"] == {row["layer"]: [row["filters_before"], row["filters_after"]]
                                           for row in written["layers"]}
    assert not list(out.parent.glob(".*.h5"))  # no temp file left beside the candidate


def test_run_prune_refuses_a_fraction_of_one(trained_workspace, tiny_data_params, tmp_path):
    with pytest.raises(PruneError, match=r"--fraction must be >= 0 and < 1 \(got 1.0\)"):
        run_prune(tiny_data_params, trained_workspace["model_path"], tmp_path / "c.h5", tmp_path, fraction=1.0)
    assert not (tmp_path / "c.h5").exists()
