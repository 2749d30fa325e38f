import os
import resource
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks.data.dataset import (
    PIXEL_CACHE_FOLDER,
    UNTYPED,
    DatasetError,
    assign_split,
    decode_all,
    decode_image,
    defect_type_of,
    list_images,
    make_dataset,
    pixel_cache_file,
    select,
    walk_files,
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


def test_walk_files_lists_what_training_lists_and_enters_no_symlinked_folder(tmp_path):
    ng = tmp_path / "NG"
    (ng / "crack" / "deep").mkdir(parents=True)
    (ng / "a.png").write_bytes(b"a")
    (ng / ".DS_Store").write_bytes(b"x")
    (ng / "crack" / "b.png").write_bytes(b"b")
    (ng / "crack" / "deep" / "c.png").write_bytes(b"c")
    (ng / ".hidden").mkdir()
    (ng / ".hidden" / "d.png").write_bytes(b"d")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "e.png").write_bytes(b"e")
    (ng / "linked").symlink_to(elsewhere, target_is_directory=True)

    found = sorted(relative for _, relative in walk_files(str(ng), "NG"))

    # Training's rglob sees the same files, a hidden folder's included; the linked folder
    # is one entry for the caller to judge, its file is not listed.
    assert found == ["NG/.hidden/d.png", "NG/a.png", "NG/crack/b.png", "NG/crack/deep/c.png", "NG/linked"]
    assert list(walk_files(str(tmp_path / "missing"), "GO")) == []


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

    from tasks.data.dataset import resolve_color_mode

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

    from tasks.model.network import build_model

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


# The file cache past train.cache_max_mb: any tiny image set is above this budget.
OVER_BUDGET_MB = 0.001
CACHE_MODEL = replace(BASE.model, input_size=(20, 24), color_mode="rgb")


def _split_images(tmp_path, split="train", seed=3):
    data = make_image_folder(tmp_path / "data", per_class=12, seed=seed)
    return select(list_images(data, replace(BASE.data, dir=str(data))), split)


def _two_epochs(images, **options):
    dataset = make_dataset(images, CACHE_MODEL, batch_size=4, shuffle_seed=5, **options)
    return [batch for _ in range(2) for batch in dataset.as_numpy_iterator()]


def _from_file(images, cache_dir):
    return _two_epochs(images, cache_max_mb=OVER_BUDGET_MB, cache_dir=cache_dir)


def _same_batches(first, second):
    return len(first) == len(second) and all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second, strict=True)
    )


def _cache_files(cache_dir):
    return sorted(p.name for p in (cache_dir / PIXEL_CACHE_FOLDER).iterdir() if p.name.endswith(("u8", ".tmp")))


def test_file_cache_gives_the_batches_and_order_of_the_memory_cache(tmp_path):
    images = _split_images(tmp_path)
    in_memory = _two_epochs(images, augment=replace(BASE.train.augment, flip=True, brightness=0.1))
    from_file = _two_epochs(images, augment=replace(BASE.train.augment, flip=True, brightness=0.1),
                            cache_max_mb=OVER_BUDGET_MB, cache_dir=tmp_path / "cache")
    assert _same_batches(in_memory, from_file)
    epoch = len(in_memory) // 2
    assert not _same_batches(in_memory[:epoch], in_memory[epoch:])  # reshuffled: the order is compared
    cache = pixel_cache_file(images, CACHE_MODEL, tmp_path / "cache")
    assert _cache_files(tmp_path / "cache") == [cache.name] and cache.name.startswith("train-")
    assert cache.stat().st_size == len(images) * 20 * 24 * 3


def test_a_second_run_on_the_same_images_reads_the_file(tmp_path):
    images = _split_images(tmp_path)
    _from_file(images, tmp_path / "cache")
    cache = pixel_cache_file(images, CACHE_MODEL, tmp_path / "cache")
    inode = cache.stat().st_ino
    cache.write_bytes(bytes([51]) * cache.stat().st_size)  # what a rerun reads, if it reads the file
    batches = _from_file(images, tmp_path / "cache")
    assert cache.stat().st_ino == inode
    assert all(np.allclose(features, 51 / 255) for features, _ in batches)


def test_a_changed_image_gets_a_new_cache_and_the_old_one_is_removed(tmp_path):
    images = _split_images(tmp_path)
    validation = _split_images(tmp_path, "validation")
    _from_file(images, tmp_path / "cache")
    _from_file(validation, tmp_path / "cache")
    old = pixel_cache_file(images, CACHE_MODEL, tmp_path / "cache")
    other = make_image_folder(tmp_path / "other", per_class=1, seed=99)
    shutil.copy(other / "GO" / "go_000.png", images[0].path)  # rewritten in place: same path, new pixels
    data = images[0].path.parents[1]
    changed = select(list_images(data, replace(BASE.data, dir=str(data))), "train")
    new = pixel_cache_file(changed, CACHE_MODEL, tmp_path / "cache")
    assert new != old
    assert _same_batches(_from_file(changed, tmp_path / "cache"), _two_epochs(changed))
    assert _cache_files(tmp_path / "cache") == sorted([new.name, pixel_cache_file(
        validation, CACHE_MODEL, tmp_path / "cache").name])  # the validation cache is another split's: kept


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path

import tasks.data.dataset as dataset
from tasks.params import replace
from tests.conftest import BASE


def write_part_then_die(handle, decoded):
    handle.write(bytes(1000))
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)


dataset._write_pixels = write_part_then_die
data, cache_dir = Path(sys.argv[1]), Path(sys.argv[2])
images = dataset.select(dataset.list_images(data, replace(BASE.data, dir=str(data))), "train")
model = replace(BASE.model, input_size=(20, 24), color_mode="rgb")
dataset.make_dataset(images, model, 4, cache_max_mb=0.001, cache_dir=cache_dir)
"""


def test_a_run_killed_while_writing_the_cache_does_not_break_the_next(tmp_path):
    images = _split_images(tmp_path)
    root = Path(__file__).resolve().parents[3]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "data"), str(tmp_path / "cache")],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftover = _cache_files(tmp_path / "cache")
    assert len(leftover) == 1 and leftover[0].startswith(".train-") and leftover[0].endswith(".tmp")

    assert _same_batches(_from_file(images, tmp_path / "cache"), _two_epochs(images))
    assert _cache_files(tmp_path / "cache") == [pixel_cache_file(images, CACHE_MODEL, tmp_path / "cache").name]


def test_no_room_for_the_cache_streams_with_a_warning(tmp_path, caplog, monkeypatch):
    images = _split_images(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    batches = _from_file(images, tmp_path / "cache")
    assert _same_batches(batches, _two_epochs(images))
    assert f"{tmp_path / 'cache' / PIXEL_CACHE_FOLDER}: cannot cache" in caplog.text
    assert "MB needed, 0 MB free" in caplog.text and "Free 0 MB on that disk" in caplog.text
    assert _cache_files(tmp_path / "cache") == []


def test_a_write_that_fails_midway_leaves_no_file_and_streams(tmp_path, caplog):
    images = _split_images(tmp_path)
    size = len(images) * 20 * 24 * 3
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # writes past half the file fail
    try:
        dataset = make_dataset(images, CACHE_MODEL, batch_size=4, shuffle_seed=5,
                               cache_max_mb=OVER_BUDGET_MB, cache_dir=tmp_path / "cache")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert "File too large" in caplog.text and "each epoch decodes them again" in caplog.text
    assert _cache_files(tmp_path / "cache") == []
    batches = [batch for _ in range(2) for batch in dataset.as_numpy_iterator()]
    assert _same_batches(batches, _two_epochs(images))


def test_two_pipelines_caching_the_same_images_at_once_share_one_file(tmp_path, caplog):
    from concurrent.futures import ThreadPoolExecutor

    images = _split_images(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: _from_file(images, tmp_path / "cache"), range(2))
    assert _same_batches(first, _two_epochs(images)) and _same_batches(second, first)
    assert "cannot cache" not in caplog.text
    assert _cache_files(tmp_path / "cache") == [pixel_cache_file(images, CACHE_MODEL, tmp_path / "cache").name]
