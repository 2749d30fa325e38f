import shutil

import pytest

from tasks.data.dataset import list_images
from tasks.data.image_manifest import ManifestError, images_digest, manifest_path, read_images
from tasks.params import replace
from tests.conftest import copy_with_defect_types, make_image_folder, tiny_params, write_manifest


def test_the_manifest_lists_the_folder_s_images_in_the_folder_scan_s_order(tmp_path):
    source = make_image_folder(tmp_path / "flat", per_class=12)
    data = copy_with_defect_types(source, tmp_path / "data")
    # "crack-x.png" sorts before "crack/..." as text but after it by path parts, as a scan sorts
    shutil.copy(next((data / "NG" / "crack").iterdir()), data / "NG" / "crack-x.png")
    (data / "NG" / "notes.txt").write_text("not an image", encoding="utf-8")
    params = replace(tiny_params(data), validate=replace(tiny_params(data).validate, min_per_class=1))
    reports = write_manifest(params, tmp_path / "reports")
    manifest = read_images(reports, params.data)
    scanned = list_images(data, params.data)
    fields = [(image.path, image.class_name, image.label, image.sha256, image.split, image.defect_type)
              for image in manifest]
    assert fields == [(image.path, image.class_name, image.label, image.sha256, image.split, image.defect_type)
                      for image in scanned]
    assert {image.mode for image in manifest} == {"RGB"}  # recorded, so training opens no file for it
    assert images_digest(manifest) == images_digest(scanned)


def test_a_stage_without_a_manifest_or_with_one_of_other_classes_is_told_to_validate(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    params = replace(tiny_params(data), validate=replace(tiny_params(data).validate, min_per_class=1))
    with pytest.raises(ManifestError, match=r"reports/manifest.csv: no manifest; run `fanaoi validate`"):
        read_images(tmp_path / "reports", params.data)
    reports = write_manifest(params, tmp_path / "reports")
    renamed = replace(params.data, classes=("OK", "NG"))
    with pytest.raises(ManifestError, match=r"manifest.csv: line 2 does not fit data.classes \['OK', 'NG'\]"):
        read_images(reports, renamed)


def test_a_reports_folder_without_a_manifest_reads_the_project_s(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    params = replace(tiny_params(data), validate=replace(tiny_params(data).validate, min_per_class=1))
    project = write_manifest(params, tmp_path / "reports")
    assert read_images(tmp_path / "elsewhere", params.data, project) == read_images(project, params.data)
    assert manifest_path(project).is_file()
