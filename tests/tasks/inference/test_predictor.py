import dataclasses

import numpy as np
import pytest

from tasks.data.dataset import list_images, select
from tasks.data.image_check import blocking_rules, inspect_image
from tasks.errors import FanaoiError
from tasks.inference.predictor import expand_paths, predict_files
from tasks.params import replace
from tasks.registry.champion import load_champion
from tasks.registry.store import RegistryError
from tests.bad_files import HOSTILE_IMAGES
from tests.conftest import BASE
from tests.tasks.champion_support import one_version_registry, review_band_registry

EXTENSIONS = (".png", ".jpg")


def test_folders_expand_to_their_images_and_files_stay_as_given(tmp_path):
    (tmp_path / "batch" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.png", ".hidden.png", "notes.txt"):
        (tmp_path / "batch" / name).write_bytes(b"x")
    explicit = tmp_path / "odd.bmp"
    files = expand_paths([tmp_path / "batch", explicit], EXTENSIONS)
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["batch/a.JPG", "batch/b.png", "batch/sub/c.png", "odd.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FanaoiError, match="empty: no images"):
        expand_paths([tmp_path / "empty"], EXTENSIONS)


def test_no_champion_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="no champion yet; train a candidate and run `fanaoi gate`"):
        load_champion(tmp_path / "registry")


@pytest.fixture
def champion(trained_workspace, tmp_path_factory):
    registry = one_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    return load_champion(registry)


@pytest.fixture
def validation_images(trained_workspace):
    data_dir = trained_workspace["data_dir"]
    params = replace(BASE.data, dir=str(data_dir), split={"train": 0.6, "validation": 0.25, "test": 0.15})
    return select(list_images(data_dir, params), "validation")


@pytest.mark.slow
def test_champion_predicts_with_its_card(champion, validation_images):
    assert champion.version == "v0001" and champion.threshold == 0.5
    assert champion.class_names == ("GO", "NG")
    assert champion.model_params.input_size == (32, 32) and champion.model_params.color_mode == "rgb"
    results = predict_files(champion, [image.path for image in validation_images], batch_size=8, limits=BASE.validate)
    assert [r["path"] for r in results] == [str(image.path) for image in validation_images]
    assert [r["label"] for r in results] == [image.class_name for image in validation_images]
    assert all(0 <= r["probability"] <= 1 and r["error"] is None for r in results)


@pytest.mark.slow
def test_batched_and_single_predictions_agree(champion, validation_images):
    paths = [image.path for image in validation_images[:6]]
    batched = [r["probability"] for r in predict_files(champion, paths, batch_size=64, limits=BASE.validate)]
    single = [predict_files(champion, [path], batch_size=1, limits=BASE.validate)[0]["probability"] for path in paths]
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.slow
def test_threshold_decides_the_label(champion, validation_images):
    path = validation_images[0].path
    probability = predict_files(champion, [path], 1, limits=BASE.validate)[0]["probability"]
    below = dataclasses.replace(champion, threshold=probability)
    above = dataclasses.replace(champion, threshold=float(np.nextafter(probability, 2.0)))
    assert predict_files(below, [path], 1, limits=BASE.validate)[0]["label"] == "NG"
    assert predict_files(above, [path], 1, limits=BASE.validate)[0]["label"] == "GO"


@pytest.mark.slow
def test_unreadable_files_get_their_own_error(champion, validation_images, tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    good = validation_images[0].path
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    files = [tmp_path / "text.png", good, tmp_path / "empty.png", tmp_path / "missing.png", truncated]
    results = predict_files(champion, files, batch_size=4, limits=BASE.validate)
    assert [r["error"] is None for r in results] == [False, True, False, False, False]
    assert results[1]["label"] == validation_images[0].class_name
    assert "not an image" in results[0]["error"]
    assert "No such file" in results[3]["error"]
    assert all(r["label"] is None and r["probability"] is None for r in results if r["error"])


@pytest.mark.slow
def test_images_the_check_refuses_get_its_reason_never_a_label(champion, validation_images, tmp_path):
    hostile = [write(tmp_path / name) for name, write in HOSTILE_IMAGES.items()]
    good = validation_images[0].path
    limits = BASE.validate

    results = predict_files(champion, [*hostile, good], batch_size=4, limits=limits)

    for path, row in zip(hostile, results, strict=False):
        expected = inspect_image(path.read_bytes(), limits).rejection(blocking_rules(limits))
        assert (row["label"], row["probability"], row["error"]) == (None, None, expected.reason)
    assert results[-1]["label"] == validation_images[0].class_name and results[-1]["error"] is None
def expected_label(probability, threshold, band):
    if band[0] <= probability < band[1]:
        return "REVIEW"
    return "NG" if probability >= threshold else "GO"


@pytest.mark.slow
def test_review_band_sends_uncertain_parts_to_a_person(
    trained_workspace, validation_images, tmp_path_factory, tmp_path
):
    base = tmp_path_factory.getbasetemp()
    paths = [image.path for image in validation_images]
    plain = predict_files(load_champion(one_version_registry(trained_workspace["data_dir"], base)), paths, 8,
                          limits=BASE.validate)
    probabilities = sorted(row["probability"] for row in plain)
    band = (probabilities[len(probabilities) // 4], probabilities[3 * len(probabilities) // 4])
    registry = review_band_registry(trained_workspace["data_dir"], base, tmp_path / "registry", band)
    champion = load_champion(registry)
    assert champion.review_band == pytest.approx(band)
    results = predict_files(champion, paths, batch_size=8, limits=BASE.validate)
    labels = [row["label"] for row in results]
    assert labels == [expected_label(row["probability"], champion.threshold, band) for row in results]
    assert labels.count("REVIEW") >= len(paths) // 3  # the middle half of the scores, ties aside
    assert {"GO", "NG"} & set(labels)
