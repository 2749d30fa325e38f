import shutil
from collections import Counter

import numpy as np
import pytest

from tasks.dataset import (
    UNTYPED,
    DatasetError,
    assign_split,
    decode_all,
    decode_image,
    defect_type_of,
    list_images,
    make_dataset,
    select,
)
from tasks.params import replace
from tests.conftest import BASE, make_image_folder

FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


def test_split_is_stable_and_follows_fractions():
    hashes = [f"{i:064x}" for i in range(4000)]
    first = [assign_split(h, "salt", FRACTIONS) for h in hashes]
    assert first == [assign_split(h, "salt", FRACTIONS) for h in hashes]
    counts = Counter(first)
    assert counts["train"] / 4000 == pytest.approx(0.7, abs=0.03)
    assert counts["validation"] / 4000 == pytest.approx(0.15, abs=0.03)
    other_salt = [assign_split(h, "other", FRACTIONS) for h in hashes]
    assert other_salt != first


def test_adding_images_never_moves_old_ones(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=20, seed=1)
    params = replace(BASE.data, dir=str(data))
    before = {i.sha256: i.split for i in list_images(data, params)}
    make_image_folder(tmp_path / "more", per_class=15, seed=2)
    for cls in ("GO", "NG"):
        for path in (tmp_path / "more" / cls).iterdir():
            shutil.copy(path, data / cls / f"new_{path.name}")
    after = {i.sha256: i.split for i in list_images(data, params)}
    assert len(after) == 70
    assert all(after[sha] == split for sha, split in before.items())


def test_labels_follow_params_order_not_alphabet(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3, classes=("ok", "defect"))
    params = replace(BASE.data, dir=str(data), classes=("ok", "defect"), positive_class="defect")
    labels = {i.class_name: i.label for i in list_images(data, params)}
    assert labels == {"ok": 0, "defect": 1}  # alphabetical order would give defect = 0


def test_unknown_class_folder_is_named(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    (data / "SCRAP").mkdir()
    with pytest.raises(DatasetError, match=r"data/SCRAP: unknown class folder"):
        list_images(data, replace(BASE.data, dir=str(data)))


def test_empty_class_is_named(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    for path in (data / "NG").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"data/NG: no images in class folder"):
        list_images(data, replace(BASE.data, dir=str(data)))


def test_empty_data_set_names_the_first_missing_class_and_the_fix(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(DatasetError, match=r"data/GO: class folder missing; create it"):
        list_images(data, replace(BASE.data, dir=str(data)))


def test_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", per_class=2)
    (data / "GO" / "notes.txt").write_text("x")
    (data / "GO" / ".DS_Store").write_bytes(b"\0")
    images = list_images(data, replace(BASE.data, dir=str(data)))
    assert len(images) == 4
    assert "skipped 1 file(s)" in caplog.text


def test_pipeline_decodes_resizes_and_scales(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=5)
    images = list_images(data, replace(BASE.data, dir=str(data)))
    for color_mode, channels in (("rgb", 3), ("grayscale", 1)):
        model = replace(BASE.model, input_size=(20, 24), color_mode=color_mode)
        batches = list(make_dataset(images, model, batch_size=4).as_numpy_iterator())
        features = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        assert features.shape == (10, 20, 24, channels)
        assert 0.0 <= features.min() and features.max() <= 1.0
        assert list(labels) == [i.label for i in images]
    assert {i.split for i in images} <= {"train", "validation", "test"}
    assert len(select(images, "train")) + len(select(images, "validation")) + len(select(images, "test")) == 10


def test_decode_all_keeps_the_order_of_the_images(tmp_path):
    import tensorflow as tf

    data = make_image_folder(tmp_path / "data", per_class=40)
    images = list_images(data, replace(BASE.data, dir=str(data)))[::-1]  # more than one batch, reversed
    model = replace(BASE.model, input_size=(16, 16))
    decoded = decode_all(images, model)
    assert decoded.shape == (80, 16, 16, 3)
    for index in (0, 63, 64, 79):
        one = decode_image(tf.io.read_file(str(images[index].path)), model).numpy()
        assert np.array_equal(decoded[index], one)


def test_defect_type_is_the_first_subfolder_under_the_positive_class(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6, seed=6)
    (data / "NG" / "crack" / "day2").mkdir(parents=True)
    (data / "NG" / "blowhole").mkdir()
    (data / "GO" / "line2").mkdir()
    (data / "NG" / "ng_000.png").rename(data / "NG" / "crack" / "ng_000.png")
    (data / "NG" / "ng_001.png").rename(data / "NG" / "crack" / "day2" / "ng_001.png")
    (data / "NG" / "ng_002.png").rename(data / "NG" / "blowhole" / "ng_002.png")
    (data / "GO" / "go_000.png").rename(data / "GO" / "line2" / "go_000.png")
    images = {image.path.relative_to(data).as_posix(): image for image in list_images(data, BASE.data)}
    types = {path: image.defect_type for path, image in images.items()}
    assert types["NG/crack/ng_000.png"] == types["NG/crack/day2/ng_001.png"] == "crack"
    assert types["NG/blowhole/ng_002.png"] == "blowhole"
    assert types["NG/ng_003.png"] == UNTYPED == "untyped"
    assert types["GO/line2/go_000.png"] is None and types["GO/go_001.png"] is None
    assert {image.label for image in images.values() if image.class_name == "NG"} == {1}  # labels stay binary
    assert Counter(types.values()) == {None: 6, "crack": 2, "blowhole": 1, "untyped": 3}


def test_defect_type_of_follows_the_positive_class_of_params():
    assert defect_type_of("NG/crack/a.png", "NG") == "crack"
    assert defect_type_of("NG/a.png", "NG") == UNTYPED
    assert defect_type_of("Defect/scratch/a.png", "Defect") == "scratch"
    assert defect_type_of("GO/scratch/a.png", "NG") is None


def test_augmentation_changes_training_images_only_and_repeats_with_its_seed(tmp_path):
    from PIL import Image

    from tasks.dataset import resolve_color_mode

    data = make_image_folder(tmp_path / "data", per_class=8)
    images = list_images(data, replace(BASE.data, dir=str(data)))
    model = replace(BASE.model, input_size=(24, 24))
    augment = replace(BASE.train.augment, flip=True, rot90=True, shift=0.1, brightness=0.1, contrast=0.2)

    def epoch(dataset):
        batches = list(dataset.as_numpy_iterator())
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    plain, plain_labels = epoch(make_dataset(images, model, 4, shuffle_seed=3))
    varied, varied_labels = epoch(make_dataset(images, model, 4, shuffle_seed=3, augment=augment))
    again, _ = epoch(make_dataset(images, model, 4, shuffle_seed=3, augment=augment))
    assert list(varied_labels) == list(plain_labels)  # same order, same labels
    assert varied.shape == plain.shape and 0.0 <= varied.min() and varied.max() <= 1.0
    assert not np.allclose(varied, plain)
    np.testing.assert_array_equal(varied, again)  # the seed fixes every variant
    off, _ = epoch(make_dataset(images, model, 4, shuffle_seed=3, augment=BASE.train.augment))
    np.testing.assert_array_equal(off, plain)

    assert resolve_color_mode(images, replace(BASE.model, color_mode="auto")).color_mode == "rgb"
    gray = tmp_path / "gray"
    for image in images:
        target = gray / image.class_name / image.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image.path).convert("L").save(target)
    gray_images = list_images(gray, replace(BASE.data, dir=str(gray)))
    assert resolve_color_mode(gray_images, replace(BASE.model, color_mode="auto")).color_mode == "grayscale"


def test_uint8_cache_and_streaming_give_the_predictions_of_float_decoding(tmp_path):
    import tensorflow as tf

    from tasks.model import build_model

    data = make_image_folder(tmp_path / "data", per_class=12)
    images = list_images(data, replace(BASE.data, dir=str(data)))
    model_params = replace(BASE.model, architecture="small_cnn", input_size=(40, 44), color_mode="rgb")
    tf.keras.utils.set_random_seed(0)
    model = build_model(model_params, 0.001)

    def inputs(**options):
        batches = make_dataset(images, model_params, batch_size=8, **options).as_numpy_iterator()
        return np.concatenate([features for features, _ in batches])

    cached, streamed = inputs(), inputs(cache_max_mb=0)
    assert cached.dtype == np.float32 and cached.shape == (24, 40, 44, 3)
    # The float path inference takes (predict, serve, export): decode_image per file.
    one_by_one = np.stack([decode_image(tf.io.read_file(str(i.path)), model_params).numpy() for i in images])
    assert np.array_equal(cached, one_by_one) and np.array_equal(streamed, one_by_one)
    expected = model.predict(one_by_one, verbose=0)
    assert np.array_equal(model.predict(cached, verbose=0), expected)
    assert np.array_equal(model.predict(streamed, verbose=0), expected)

    # Against float32 pixels never rounded to 8 bits: the rounding moves p(NG) by less than 1e-3.
    def unrounded(path):
        pixels = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        return tf.image.resize(pixels, (40, 44), method="bilinear", antialias=True).numpy() / 255.0

    exact = np.stack([unrounded(i.path) for i in images])
    assert 0 < np.abs(exact - one_by_one).max() <= 0.5 / 255 + 1e-6
    assert np.abs(model.predict(exact, verbose=0) - expected).max() < 1e-3
