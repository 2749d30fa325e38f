import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from tasks.inference.model_file import load_model, model_params_from_file
from tasks.params import replace
from tasks.registry.champion import read_champion, read_embedded_card
from tasks.registry.export import RUNNERS, ExportError, check_images, export_version
from tasks.registry.store import RegistryError
from tests.conftest import BASE
from tests.tasks.champion_support import (
    copy_registry,
    gate_candidate,
    gate_params,
    one_version_registry,
    two_version_registry,
    write_params_file,
)

FORMATS = {"tflite": "model.tflite", "onnx": "model.onnx", "savedmodel": "saved_model"}


@pytest.fixture
def registry(trained_workspace, tmp_path_factory, tmp_path):
    source = one_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    return copy_registry(source, tmp_path / "registry")


@pytest.fixture
def params(trained_workspace, registry):
    return gate_params(trained_workspace["data_dir"], registry)


def cards_of(registry, version):
    """Every copy of a version's card: card.json and the one inside model.h5."""
    folder = registry / "versions" / version
    return [json.loads((folder / "card.json").read_text()), read_embedded_card(folder / "model.h5")]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_export_matches_keras_and_is_listed_on_the_cards(params, registry, fmt):
    entry = export_version(params, fmt)

    export = registry / "versions" / "v0001" / "exports" / FORMATS[fmt]
    assert export.exists() and entry["path"] == f"exports/{FORMATS[fmt]}"
    assert entry["max_abs_diff"] < 1e-4 and entry["checked_images"] > 0 and entry["bytes"] > 0
    # Run the written file again, independently of the check export_version made.
    model_path = registry / "versions" / "v0001" / "model.h5"
    images = check_images(params.data, Path(params.paths.reports), model_params_from_file(model_path), 200)
    keras_probabilities = load_model(model_path).predict(images, verbose=0).reshape(-1)
    assert np.max(np.abs(RUNNERS[fmt](export, images) - keras_probabilities)) < 1e-4
    # v0001 is the champion: its card agrees everywhere, and the registry still trusts it.
    champion = read_champion(registry)
    assert champion.problem is None and champion.version == "v0001"
    for card in [*cards_of(registry, "v0001"), champion.card, json.loads((registry / "champion.json").read_text())]:
        assert card["exports"] == {fmt: entry}


@pytest.mark.slow
def test_exports_accumulate_and_an_older_version_leaves_the_champion_card_alone(
    trained_workspace, tmp_path_factory, tmp_path
):
    source = two_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    registry = copy_registry(source, tmp_path / "registry")
    params = gate_params(trained_workspace["data_dir"], registry)

    export_version(params, "tflite", "1")
    export_version(params, "onnx", "v0001")

    for card in cards_of(registry, "v0001"):
        assert sorted(card["exports"]) == ["onnx", "tflite"]
    assert read_champion(registry).version == "v0002"
    assert "exports" not in read_champion(registry).card
    assert "exports" not in json.loads((registry / "champion.json").read_text())


@pytest.mark.slow
def test_an_export_that_differs_from_keras_is_not_kept(params, registry):
    strict = replace(params, export=replace(BASE.export, max_abs_diff=0.0))
    with pytest.raises(ExportError, match=r"differs from Keras by up to .* not kept"):
        export_version(strict, "tflite")
    assert list((registry / "versions" / "v0001" / "exports").iterdir()) == []
    assert all("exports" not in card for card in cards_of(registry, "v0001"))


def test_a_bad_version_is_a_clear_error(params, registry, trained_workspace, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"v0042: no such published version; versions: v0001"):
        export_version(params, "tflite", "42")
    with pytest.raises(RegistryError, match="'latest' is not a version; versions look like v0003"):
        export_version(params, "onnx", "latest")
    empty = replace(params, registry=replace(params.registry, dir=str(tmp_path / "none")))
    with pytest.raises(RegistryError, match="no champion yet"):
        export_version(empty, "savedmodel")

    params_file = write_params_file(tmp_path / "params.yaml", trained_workspace["data_dir"], registry)
    assert main(["--params", str(params_file), "export", "--format", "tflite", "v0007"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("fanaoi export: error: ") and "v0007: no such published version" in error
    assert len(error.splitlines()) == 1


@pytest.mark.slow
def test_the_cli_exports_the_champion(registry, trained_workspace, tmp_path, capsys):
    params_file = write_params_file(tmp_path / "params.yaml", trained_workspace["data_dir"], registry)
    assert main(["--params", str(params_file), "export", "--format", "savedmodel"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported the champion as savedmodel: exports/saved_model (")
    assert "max abs difference from Keras" in out and "(tensorflow 2.21" in out
    assert (registry / "versions" / "v0001" / "exports" / "saved_model" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_an_aoi_cnn_champion_exports_to_every_format_with_the_same_answers(trained_workspace, tmp_path):
    """The input standardization, BatchNorm in inference mode and global pooling survive TFLite,
    ONNX and SavedModel."""
    from tasks.registry.publish import publish
    from tests.tasks.champion_support import train_good_model

    registry = tmp_path / "registry"
    base = gate_params(trained_workspace["data_dir"], registry, min_accuracy=0.0, max_escape_rate=1.0)
    params = replace(
        base,
        model=replace(BASE.model, architecture="aoi_cnn", input_size=(32, 32), conv_filters=(8, 16), stem_stride=2,
                      standardize=True),
        train=replace(base.train, epochs=3),
    )
    candidate = train_good_model(params, tmp_path / "candidate.h5")
    result = gate_candidate(params, candidate, tmp_path / "reports", record=False)
    publish(candidate, result, params)
    for fmt, name in FORMATS.items():
        entry = export_version(params, fmt)
        assert entry["max_abs_diff"] < 1e-4 and entry["checked_images"] > 0, fmt
        assert (registry / "versions" / "v0001" / "exports" / name).exists()
