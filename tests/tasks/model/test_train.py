import csv
import json

import h5py
import pytest

from tasks.inference.model_file import MAPPING_ATTR
from tasks.model.train import run_train
from tasks.params import replace
from tests.conftest import BASE, make_image_folder, tiny_params, write_manifest


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


def test_training_without_validate_s_manifest_names_it_and_the_fix_and_writes_no_model(tmp_path):
    from tasks.data.image_manifest import ManifestError

    data = make_image_folder(tmp_path / "data", per_class=4)
    with pytest.raises(ManifestError, match=r"reports/manifest.csv: no manifest; run `fanaoi validate`"):
        run_train(tiny_params(data), tmp_path / "models" / "c.h5", tmp_path / "reports")
    assert not (tmp_path / "models").exists()


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
    summary = run_train(params, tmp_path / "candidate.h5", write_manifest(params, tmp_path / "reports"))
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
    from tasks.model.history import read_history

    data = make_image_folder(tmp_path / "data", per_class=16, seed=4)
    in_memory = tiny_params(data)
    from_files = replace(in_memory, train=replace(in_memory.train, cache_max_mb=0.001),
                         validate=replace(in_memory.validate, cache_dir=str(tmp_path / "cache")))
    run_train(in_memory, tmp_path / "memory.h5", write_manifest(in_memory, tmp_path / "memory"))
    run_train(from_files, tmp_path / "files.h5", write_manifest(from_files, tmp_path / "files"))
    cached = sorted(path.name.split("-")[0] for path in (tmp_path / "cache" / PIXEL_CACHE_FOLDER).glob("*.u8"))
    assert cached == ["train", "validation"]
    for files, memory in zip(read_history(tmp_path / "files" / "history.csv"),
                             read_history(tmp_path / "memory" / "history.csv"), strict=True):
        assert files == pytest.approx(memory, rel=1e-5)  # the same batches in the same order
