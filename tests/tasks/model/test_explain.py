"""fanaoi explain: filters, feature maps, Grad-CAM on the mistakes, written as HTML and PNGs."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.dataset import list_images, select
from tasks.inference.predictor import predict_files, predictor_from_file
from tasks.model.explain_pictures import feature_grid, filter_grid, grad_cam, normalise_kernel, overlay
from tasks.params import replace
from tasks.registry.explain_source import explain_model
from tests.browser_support import external_references, offline_dom, requires_chromium, tables
from tests.conftest import BASE, copy_with_defect_types, write_manifest


def _with(params, **sections):
    return replace(params, **sections)


def _validation_outcomes(workspace, threshold):
    """Escapes and overkills by the production predict path, not by tasks.model.explain."""
    params = workspace["params"]
    validation = select(list_images(params.data.dir, params.data), "validation")
    predictor = predictor_from_file(workspace["model_path"], threshold)
    results = predict_files(predictor, [image.path for image in validation], batch_size=16, limits=BASE.validate)
    escapes = {r["path"] for i, r in zip(validation, results, strict=True) if i.class_name == "NG" != r["label"]}
    overkills = {r["path"] for i, r in zip(validation, results, strict=True) if i.class_name == "GO" != r["label"]}
    return validation, [r["probability"] for r in results], escapes, overkills


@pytest.fixture(scope="module")
def explained(trained_workspace, tmp_path_factory):
    """The tiny candidate explained at the median validation probability as its threshold.

    The 3-epoch model scores every image near the same value; the median threshold makes
    it wrong both ways, so the report has escapes and overkills.
    """
    _, probabilities, _, _ = _validation_outcomes(trained_workspace, 0.5)
    threshold = float(np.median(probabilities))
    params = trained_workspace["params"]
    params = _with(params, evaluate=replace(params.evaluate, threshold=threshold))
    out = tmp_path_factory.mktemp("explain") / "candidate"
    summary = explain_model(
        params, model_path=trained_workspace["model_path"], out_dir=out,
        reports_dir=trained_workspace["reports"],
    )
    _, _, escapes, overkills = _validation_outcomes(trained_workspace, threshold)
    return {"summary": summary, "out": out, "params": params, "escapes": escapes, "overkills": overkills}


def test_one_heatmap_per_misclassified_image_escapes_first(explained):
    out, summary = explained["out"], explained["summary"]
    expected = len(explained["escapes"]) + len(explained["overkills"])
    assert explained["escapes"] and explained["overkills"]
    pngs = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(pngs) == expected == len(summary["heatmaps"])
    kinds = [re.match(r"\d{3}-(escape|overkill)\.png", name).group(1) for name in pngs]
    assert kinds == ["escape"] * len(explained["escapes"]) + ["overkill"] * len(explained["overkills"])
    assert set(summary["escapes"]) == explained["escapes"]
    assert set(summary["overkills"]) == explained["overkills"]
    # The page shows them in the same order, each beside its file name.
    page = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r'src="heatmaps/([^"]+)"', page) == pngs
    assert page.index("Escapes (") < page.index("Overkills (")
    assert summary["left_out"] == 0


def test_report_holds_filters_feature_maps_curves_and_scores(explained, trained_workspace):
    out, summary = explained["out"], explained["summary"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert Image.open(out / "filters.png").size == filter_grid_size(8)
    layers = [entry["layer"] for entry in summary["feature_maps"]]
    assert len(layers) == 2
    for entry in summary["feature_maps"]:
        assert (out / entry["png"]).is_file() and f'src="{entry["png"]}"' in page
    confusion = summary["validation"]["confusion"]
    assert confusion["fn"] == len(explained["escapes"]) and confusion["fp"] == len(explained["overkills"])
    assert "ROC (validation)" in page and "Accuracy per epoch" in page and "Loss per epoch" in page
    assert f"{trained_workspace['reports'] / 'history.csv'}" in page
    assert "evaluate.threshold in params.yaml" in page


def filter_grid_size(filters: int, cell: int = 36, gap: int = 2) -> tuple[int, int]:
    columns = int(np.ceil(np.sqrt(filters)))
    rows = int(np.ceil(filters / columns))
    return columns * (cell + gap) - gap, rows * (cell + gap) - gap


def test_max_heatmaps_caps_the_pictures_and_says_how_many_are_left_out(explained, trained_workspace, tmp_path):
    params = _with(explained["params"], explain=replace(BASE.explain, max_heatmaps=2))
    summary = explain_model(params, model_path=trained_workspace["model_path"], out_dir=tmp_path)
    total = len(explained["escapes"]) + len(explained["overkills"])
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 2
    assert summary["left_out"] == total - 2
    assert f"{total - 2} mistake(s) left out" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_text_from_file_names_is_escaped(explained, trained_workspace, tmp_path):
    first = select(list_images(explained["params"].data.dir, explained["params"].data), "validation")[0]
    odd = tmp_path / "fan <b>&'x'.png"
    shutil.copyfile(first.path, odd)
    explain_model(
        explained["params"], model_path=trained_workspace["model_path"], image_path=odd,
        out_dir=tmp_path / "report",
    )
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "<b>" not in page and "fan &lt;b&gt;&amp;&#x27;x&#x27;.png" in page


def test_filter_grid_has_one_normalised_cell_per_first_layer_filter(trained_workspace):
    from tasks.inference.model_file import load_model

    model = load_model(trained_workspace["model_path"])
    kernels = model.layers[0].get_weights()[0]
    grid = filter_grid(model)
    assert grid.cells == kernels.shape[3] == 8
    for k in range(grid.cells):
        top, left, bottom, right = grid.box(k)
        cell = grid.image[top:bottom, left:right]
        weights = kernels[..., k]
        expected = np.round((weights - weights.min()) / (weights.max() - weights.min()) * 255)
        # Nearest-neighbour upscaling: each weight is a solid square of the cell.
        step = cell.shape[0] // weights.shape[0]
        assert np.array_equal(cell[::step, ::step], expected.astype(np.uint8))
        assert cell.min() == 0 and cell.max() == 255
    assert (grid.image[:, grid.cell[1] : grid.cell[1] + 2] == 255).all()  # the gap


def test_normalise_kernel_of_a_constant_kernel_is_black():
    assert not normalise_kernel(np.full((3, 3, 3), 0.2)).any()


def test_grad_cam_map_has_the_image_size_and_values_in_unit_range(trained_workspace):
    from tasks.inference.model_file import load_model
    from tasks.model.explain import decode_file

    params = trained_workspace["params"]
    model = load_model(trained_workspace["model_path"])
    images = select(list_images(params.data.dir, params.data), "validation")[:4]
    batch = np.stack([decode_file(image.path, params.model) for image in images])
    for targets in ([1, 1, 1, 1], [0, 1, 0, 1]):
        maps, probabilities = grad_cam(model, batch, np.array(targets))
        assert maps.shape == (4, 32, 32)
        assert maps.min() >= 0.0 and maps.max() <= 1.0
        assert np.allclose(probabilities, model.predict(batch, verbose=0).reshape(-1), atol=1e-5)


def test_overlay_and_feature_grid_shapes():
    original = Image.new("RGB", (40, 30), "gray")
    heat = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    assert overlay(original, [heat, heat]).size == (3 * 40 + 2 * 2, 30)
    activations = np.zeros((5, 5, 3))
    activations[..., 1] = np.arange(25).reshape(5, 5)
    grid = feature_grid(activations)
    assert grid.cells == 3
    top, left, bottom, right = grid.box(0)
    assert not grid.image[top:bottom, left:right].any()  # a silent filter is black
    top, left, bottom, right = grid.box(1)
    assert grid.image[top:bottom, left:right].max() == 255


def test_unknown_class_in_data_is_named(trained_workspace, tmp_path):
    from tasks.model.explain import ExplainError

    data = tmp_path / "data"
    shutil.copytree(trained_workspace["data_dir"], data)
    (data / "GO").rename(data / "OK")
    params = trained_workspace["params"]
    params = _with(params, data=replace(BASE.data, dir=str(data), classes=("OK", "NG"), split=params.data.split))
    reports = write_manifest(params, tmp_path / "reports")
    with pytest.raises(ExplainError, match=r"knows the classes \['GO', 'NG'\] but the data has OK"):
        explain_model(params, model_path=trained_workspace["model_path"], out_dir=tmp_path / "out",
                      reports_dir=reports)


def test_a_path_that_is_not_an_image_is_named(trained_workspace, tmp_path):
    from tasks.model.explain import ExplainError

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ExplainError, match="notes.png: cannot be read as an image"):
        explain_model(
            trained_workspace["params"], model_path=trained_workspace["model_path"],
            image_path=bad, out_dir=tmp_path / "out",
        )


def test_version_and_model_are_exclusive(trained_workspace):
    from tasks.model.explain import ExplainError

    with pytest.raises(ExplainError, match="not both"):
        explain_model(trained_workspace["params"], version="v1", model_path=Path("x.h5"))


def test_a_grayscale_model_is_drawn_in_gray(trained_workspace, tmp_path):
    from tasks.model.network import build_model, save_model

    params = trained_workspace["params"]
    gray = replace(params.model, color_mode="grayscale")
    model_path = save_model(
        build_model(gray, learning_rate=0.001), tmp_path / "gray.h5", params.data.class_mapping, gray
    )
    summary = explain_model(params, model_path=model_path, out_dir=tmp_path / "report")
    filters = np.asarray(Image.open(tmp_path / "report" / "filters.png"))
    assert summary["filters"]["count"] == 8 and summary["input"]["color_mode"] == "grayscale"
    assert np.array_equal(filters[..., 0], filters[..., 1])  # one channel, shown as gray
    assert len(list((tmp_path / "report" / "heatmaps").glob("*.png"))) == len(summary["heatmaps"])


def test_page_gives_escapes_per_defect_type_with_upper_bounds(trained_workspace, tmp_path):
    params = trained_workspace["params"]
    data = copy_with_defect_types(trained_workspace["data_dir"], tmp_path / "data")
    params = _with(params, data=replace(params.data, dir=str(data)), explain=replace(BASE.explain, max_heatmaps=0))
    summary = explain_model(params, model_path=trained_workspace["model_path"], out_dir=tmp_path / "out",
                            reports_dir=write_manifest(params, tmp_path / "reports"))
    validation = select(list_images(data, params.data), "validation")
    per_type = summary["validation"]["defect_types"]
    assert {kind: row["count"] for kind, row in per_type.items()} == Counter(
        image.defect_type for image in validation if image.defect_type)
    escaped = Counter(image.defect_type for image in validation if str(image.path) in summary["escapes"])
    assert {kind: row["escapes"] for kind, row in per_type.items()} == {kind: escaped[kind] for kind in per_type}
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<h3>Escapes per defect type</h3>" in page
    for kind, row in per_type.items():
        assert (f"<tr><td>{kind}</td><td>{row['count']}</td><td>{row['escapes']}</td>"
                f"<td>{row['escape_rate']:.4f}</td><td>{row['escape_rate_upper95']:.4f}</td></tr>") in page
    assert f"(95 % upper bound {summary['validation']['escape_rate_upper95']:.4f})" in page


@requires_chromium
@pytest.mark.integration
def test_page_draws_its_charts_tables_and_pictures_offline(explained, tmp_path):
    out = explained["out"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert external_references(page) == []
    assert '<a id="home" href="/">' in page  # back to the line's home page of `fanaoi serve-model`
    dom = offline_dom(out / "index.html", tmp_path / "profile")
    charts = re.findall(r'<svg[^>]*aria-label="([^"]+)"', dom)
    assert charts == ["ROC (validation)", "Accuracy per epoch", "Loss per epoch"]
    confusion = explained["summary"]["validation"]["confusion"]
    shown = list(tables(dom).values())
    assert shown[1][0] == ["actual \\ predicted", "GO", "NG"]
    assert shown[1][1] == ["GO", f"{confusion['tn']} correct", f"{confusion['fp']} overkill"]
    pictures = re.findall(r'<img[^>]*src="([^"]+)"', dom)
    assert len(pictures) == 1 + len(explained["summary"]["feature_maps"]) + len(explained["summary"]["heatmaps"])
    assert all((out / picture).is_file() for picture in pictures)
