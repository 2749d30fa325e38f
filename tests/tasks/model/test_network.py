import h5py
import numpy as np
import pytest

from tasks.inference.model_file import TRAINING_ATTR, load_model, read_model_metadata
from tasks.model.network import build_model, edge_kernels, save_model
from tasks.params import ModelParams, ParamsError, replace
from tests.conftest import BASE

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)


def tiny_model_params(**overrides: object) -> ModelParams:
    settings = {"input_size": (32, 32), "conv_filters": (16, 8), "dense_units": 8, **overrides}
    return replace(BASE.model, **settings)


def first_kernel(params: ModelParams, seed: int = 3) -> np.ndarray:
    import keras

    keras.utils.set_random_seed(seed)
    return build_model(params, 0.001).layers[0].get_weights()[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_edges_put_sobel_first_in_every_channel_and_glorot_after_the_bank():
    edges = first_kernel(tiny_model_params(first_layer_init="edges"))
    glorot = first_kernel(tiny_model_params())
    channels = edges.shape[2]
    for channel in range(channels):
        assert cosine(edges[:, :, channel, 0], SOBEL_X) == pytest.approx(1.0, abs=1e-6)
        assert cosine(edges[:, :, channel, 1], SOBEL_X.T) == pytest.approx(1.0, abs=1e-6)
    bank = edge_kernels().shape[-1]
    np.testing.assert_array_equal(edges[..., bank:], glorot[..., bank:])
    # scaled to a glorot filter's typical size, so no filter dominates the layer at the start
    norms = np.linalg.norm(edges.reshape(-1, edges.shape[-1]), axis=0)
    glorot_norms = np.linalg.norm(glorot.reshape(-1, glorot.shape[-1]), axis=0)
    assert np.allclose(norms[:bank], norms[0])
    assert 0.5 < norms[0] / np.mean(glorot_norms) < 2.0


def test_edge_bank_has_no_brightness_response():
    assert np.allclose(edge_kernels().sum(axis=(0, 1)), 0.0)


def test_first_layer_init_is_seeded_and_he_normal_differs():
    he = tiny_model_params(first_layer_init="he_normal")
    np.testing.assert_array_equal(first_kernel(he), first_kernel(he))
    # he_normal draws larger weights than glorot_uniform for a 3x3 kernel
    assert np.std(first_kernel(he)) > 1.5 * np.std(first_kernel(tiny_model_params()))


def test_unknown_first_layer_init_is_refused():
    with pytest.raises(ParamsError, match="model.first_layer_init must be one of"):
        replace(BASE.model, first_layer_init="sobel")


def test_saved_model_keeps_edge_kernels_and_its_training_record(tmp_path):
    import keras

    params = tiny_model_params(first_layer_init="edges")
    keras.utils.set_random_seed(0)
    model = build_model(params, 0.001)
    path = save_model(model, tmp_path / "m.h5", {"GO": 0, "NG": 1}, params,
                      training={"init": {"from": "random"}})
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.layers[0].get_weights()[0], model.layers[0].get_weights()[0])
    assert read_model_metadata(path)["training"] == {
        "first_layer_init": "edges", "init": {"from": "random"},
    }


def test_standardize_makes_the_answer_independent_of_lighting_and_survives_save(tmp_path):
    """The input standardization removes a brightness offset exactly and a contrast change up
    to its epsilon; edge kernels still go into the first convolution; the .h5 keeps it."""
    import keras

    params = tiny_model_params(architecture="aoi_cnn", conv_filters=(8, 16), stem_stride=2, pooling="max",
                               standardize=True, first_layer_init="edges")
    keras.utils.set_random_seed(0)
    model = build_model(params, 0.001)
    assert cosine(model.get_layer("conv1").get_weights()[0][:, :, 0, 0], SOBEL_X) > 0.999
    keras.utils.set_random_seed(0)
    plain = build_model(replace(params, standardize=False), 0.001)
    images = np.random.default_rng(1).uniform(0.2, 0.6, (6, 32, 32, 3)).astype("float32")
    brighter, stronger = images + 0.25, (images - 0.4) * 1.5 + 0.4

    def answers(m, x):
        return m.predict(x, verbose=0).ravel()

    np.testing.assert_allclose(answers(model, brighter), answers(model, images), atol=1e-5)
    np.testing.assert_allclose(answers(model, stronger), answers(model, images), atol=5e-3)
    assert np.abs(answers(plain, brighter) - answers(plain, images)).max() > 1e-3
    path = save_model(model, tmp_path / "m.h5", {"GO": 0, "NG": 1}, params)
    loaded = load_model(path)
    assert loaded.get_layer("standardize").count_params() == 0
    np.testing.assert_allclose(answers(loaded, images), answers(model, images), atol=1e-6)


def test_a_file_without_training_record_reads_as_empty(tmp_path):
    params = tiny_model_params()
    path = save_model(build_model(params, 0.001), tmp_path / "old.h5", {"GO": 0, "NG": 1}, params)
    with h5py.File(path, "a") as handle:
        del handle.attrs[TRAINING_ATTR]
    assert read_model_metadata(path)["training"] == {}


def test_batch_norm_trains_with_the_fused_kernel_and_keras_arithmetic(tmp_path):
    import keras
    import tensorflow as tf

    params = tiny_model_params(architecture="aoi_cnn", dropout=0.0, color_mode="grayscale")
    keras.utils.set_random_seed(0)
    fused = build_model(params, 0.001)
    plain = keras.models.clone_model(fused)  # rebuilt from config: Keras' own batch norm
    plain.set_weights(fused.get_weights())
    images = np.random.default_rng(0).random((2, 32, 32, fused.input_shape[-1]), dtype=np.float32)
    labels = np.array([[0.0], [1.0]], dtype=np.float32)

    def step(model):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss = keras.losses.binary_crossentropy(labels, outputs)
        return outputs.numpy(), [grad.numpy() for grad in tape.gradient(loss, model.trainable_weights)]

    (fused_out, fused_grads), (plain_out, plain_grads) = step(fused), step(plain)
    np.testing.assert_allclose(fused_out, plain_out, atol=1e-6)
    for ours, keras_grad in zip(fused_grads, plain_grads, strict=True):
        np.testing.assert_allclose(ours, keras_grad, rtol=1e-3, atol=1e-6)
    norms = [layer for layer in fused.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for layer in norms:  # moving statistics: biased variance, Keras' momentum
        twin = plain.get_layer(layer.name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), twin.moving_mean.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(layer.moving_variance.numpy(), twin.moving_variance.numpy(), rtol=1e-6)

    traced = tf.function(lambda batch: fused(batch, training=True)).get_concrete_function(
        tf.TensorSpec((2, 32, 32, fused.input_shape[-1]), tf.float32))
    assert sum(op.type.startswith("FusedBatchNorm") for op in traced.graph.get_operations()) == len(norms)

    path = save_model(fused, tmp_path / "m.h5", {"GO": 0, "NG": 1}, params)
    loaded = load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in plain.layers]
    np.testing.assert_allclose(loaded(images, training=False).numpy(), fused(images, training=False).numpy(), atol=1e-6)
