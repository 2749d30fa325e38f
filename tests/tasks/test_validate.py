import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from tasks.dataset import DatasetError, assign_split, list_images
from tasks.params import DataParams, replace
from tasks.validate import ValidationFailed, run_validate
from tests.bad_files import (
    write_bomb_png,
    write_corrupt_png,
    write_text_as_png,
    write_truncated_jpeg,
    write_zero_byte,
)
from tests.conftest import BASE, copy_with_defect_types, make_image_folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its size, mtime and content hash (or link target)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            if path.is_symlink():
                content = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = "folder"
            state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, content)
    return state


def write_near_duplicate(data: Path, split_params: DataParams) -> tuple[str, str]:
    """A one-pixel edit of a train image that lands in validation or test."""
    for source in sorted((data / "GO").glob("go_*.png")):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if assign_split(digest, split_params.split_salt, split_params.split) != "train":
            continue
        pixels = np.asarray(Image.open(source)).copy()
        for step in range(1, 60):
            pixels[0, 0, 0] = (int(pixels[0, 0, 0]) + step) % 256
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            digest = hashlib.sha256(buffer.getvalue()).hexdigest()
            if assign_split(digest, split_params.split_salt, split_params.split) != "train":
                (data / "GO" / "retake.png").write_bytes(buffer.getvalue())
                return f"GO/{source.name}", "GO/retake.png"
    raise AssertionError("no near-duplicate outside the train split")


def params_file(tmp: Path, data: Path) -> Path:
    path = tmp / "params.yaml"
    path.write_text(
        f"data:\n  dir: {data}\n"
        f"validate:\n  max_pixels: 1000000\n  min_per_class: 10\n  cache_dir: {tmp / 'cache'}\n"
    )
    return path


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """One data set holding every bad input, validated once through `fanaoi validate`."""
    tmp = tmp_path_factory.mktemp("bad")
    data = make_image_folder(tmp / "data", per_class=24, seed=3)
    write_corrupt_png(data / "GO" / "corrupt.png")
    write_truncated_jpeg(data / "GO" / "truncated.jpg")
    write_zero_byte(data / "NG" / "empty.png")
    write_text_as_png(data / "GO" / "notes.png")
    write_bomb_png(data / "NG" / "bomb.png", 2000)
    shutil.copy(data / "GO" / "go_000.png", data / "NG" / "relabelled.png")
    shutil.copy(data / "GO" / "go_001.png", data / "GO" / "go_001_copy.png")
    (data / "scrap").mkdir()
    (data / "scrap" / "old.png").write_bytes((data / "GO" / "go_002.png").read_bytes())
    (tmp / "private.png").write_bytes((data / "GO" / "go_003.png").read_bytes())
    os.symlink(tmp / "private.png", data / "NG" / "linked.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(data / "GO" / "overexposed.png")
    train_image, near_copy = write_near_duplicate(data, BASE.data)
    before = snapshot(tmp)
    stdout, stderr = io.StringIO(), io.StringIO()
    reports = tmp / "reports"
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--params", str(params_file(tmp, data)), "validate", "--reports", str(reports)])
    return {
        "code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
        "report": json.loads((reports / "validation-details.json").read_text()),
        "data": data, "before": before, "after": snapshot(tmp),
        "near": (train_image, near_copy), "reports": reports,
    }


def problems_of(run: dict, relative: str) -> list[dict]:
    path = str(run["data"] / relative).rstrip("/")
    return [p for p in run["report"]["failing_files"] if p["path"] == path]


@pytest.mark.parametrize(
    ("relative", "rule", "severity", "reason"),
    [
        ("GO/corrupt.png", "readable", "blocking", "corrupt image"),
        ("GO/truncated.jpg", "readable", "blocking", "truncated"),
        ("NG/empty.png", "not_empty", "blocking", "zero-byte file"),
        ("GO/notes.png", "readable", "blocking", "not an image"),
        ("NG/bomb.png", "readable", "blocking", "decompression bomb: 4,000,000 pixels"),
        ("GO/go_000.png", "no_label_conflict", "blocking", "NG/relabelled.png"),
        ("NG/relabelled.png", "no_label_conflict", "blocking", "GO/go_000.png"),
        ("GO/go_001.png", "unique_in_class", "warning", "GO/go_001_copy.png"),
        ("GO/go_001_copy.png", "unique_in_class", "warning", "GO/go_001.png"),
        ("scrap", "no_unexpected_folders", "blocking", "unexpected folder (1 file(s))"),
        ("NG/linked.png", "no_symlink_outside", "blocking", "outside the data folder"),
        ("GO/overexposed.png", "brightness_in_range", "warning", "mean brightness 255"),
    ],
)
def test_bad_input_is_named_with_its_reason(bad_run, relative, rule, severity, reason):
    (problem,) = problems_of(bad_run, relative)
    assert (problem["rule"], problem["severity"]) == (rule, severity)
    assert reason in problem["reason"]
    line = f"{severity}: {problem['path']}: {problem['reason']} [{rule}]"
    assert line in bad_run["stdout"].splitlines()


def test_near_duplicate_of_a_train_image_is_reported_as_leak(bad_run):
    train_image, near_copy = bad_run["near"]
    (problem,) = problems_of(bad_run, near_copy)
    assert problem["rule"] == "no_near_duplicate_leak" and problem["severity"] == "warning"
    assert str(bad_run["data"] / train_image) in problem["reason"]


def test_blocking_failure_exits_1_with_files_and_reasons(bad_run):
    assert bad_run["code"] == 1
    report = bad_run["report"]
    assert report["valid"] is False
    assert report["blocking_failures"] == 9 and report["warnings"] == 4
    assert report["expectations"]["readable"] == {"success": False, "blocking": True, "unexpected": 4}
    assert report["expectations"]["format_allowed"]["success"] is True
    error = bad_run["stderr"].strip()
    assert error.count("\n") == 0
    assert error.startswith("fanaoi validate: error: 9 blocking problem(s):")
    assert f"{bad_run['data'] / 'GO' / 'corrupt.png'}: truncated or corrupt image" in error
    assert "INVALID" in bad_run["stdout"]


def test_validation_changes_no_file(bad_run):
    changed = {
        path for path, state in bad_run["after"].items()
        if path.startswith(("data", "private")) and bad_run["before"].get(path) != state
    }
    gone = {p for p in bad_run["before"] if p not in bad_run["after"]}
    assert changed == set() and gone == set()


def test_clean_data_set_passes_with_report_and_page(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=24, seed=4)
    params = replace(BASE,
        data=replace(BASE.data, dir=str(data)),
        validate=replace(BASE.validate, min_per_class=10, cache_dir=str(tmp_path / "cache")),
    )
    lines: list[str] = []
    result = run_validate(params, tmp_path / "reports", report=lines.append)
    assert result["valid"] and result["failing_files"] == []
    assert result["usable_images"] == 48 and result["classes"]["NG"]["images"] == 24
    assert sum(result["splits"].values()) == 48
    assert all(e["success"] for e in result["expectations"].values())
    assert len(result["expectations"]) == len(params.validate.severity)
    stored = json.loads((tmp_path / "reports" / "validation-details.json").read_text())
    assert stored == result
    assert lines == [result["summary"]] and "valid; 48 usable images (GO 24, NG 24)" in lines[0]
    page = (tmp_path / "reports" / "validation.html").read_text()
    assert result["page"] == str(tmp_path / "reports" / "validation.html")
    assert all(f"<td>{rule}</td>" in page for rule in params.validate.severity)
    assert "<h1>Validation: <span class=\"pass\">valid</span></h1>" in page


def test_empty_class_blocks_and_writes_the_report_first(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12, seed=5)
    for image in (data / "NG").iterdir():
        image.unlink()
    params = replace(BASE,
        data=replace(BASE.data, dir=str(data)),
        validate=replace(BASE.validate, min_per_class=10, cache_dir=str(tmp_path / "cache")),
    )
    with pytest.raises(ValidationFailed, match=r"NG: class NG has 0 usable image\(s\)"):
        run_validate(params, tmp_path / "reports", report=lambda _: None)
    report = json.loads((tmp_path / "reports" / "validation-details.json").read_text())
    assert report["valid"] is False and report["classes"]["NG"]["images"] == 0
    assert {p["rule"] for p in report["failing_files"]} == {"min_per_class", "class_fraction"}


def test_severity_from_params_turns_a_block_into_a_warning(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12, seed=6)
    shutil.copy(data / "GO" / "go_000.png", data / "NG" / "relabelled.png")
    rules = replace(BASE.validate,
        min_per_class=10, cache_dir=str(tmp_path / "cache"),
        severity={**BASE.validate.severity, "no_label_conflict": "warning"},
    )
    params = replace(BASE, data=replace(BASE.data, dir=str(data)), validate=rules)
    result = run_validate(params, tmp_path / "reports", report=lambda _: None)
    assert result["valid"] and result["warnings"] == 2
    assert result["expectations"]["no_label_conflict"]["blocking"] is False


def test_missing_data_folder_names_the_fix(tmp_path):
    params = replace(BASE, data=replace(BASE.data, dir=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="nowhere: data folder not found.*fanaoi demo-data"):
        run_validate(params, tmp_path / "reports")


def test_defect_type_subfolders_are_counted_not_flagged_while_a_stray_root_folder_is(tmp_path):
    source = make_image_folder(tmp_path / "flat", per_class=24, seed=7)
    data = copy_with_defect_types(source, tmp_path / "data")  # NG/crack/, NG/blowhole/, NG/ (untyped)
    (data / "GO" / "line2").mkdir()  # GO may be organised in subfolders too: no type, no flag
    (data / "GO" / "go_000.png").rename(data / "GO" / "line2" / "go_000.png")
    (data / "NG" / "crack" / "day2").mkdir()  # deeper folders belong to their first subfolder's type
    first_crack = sorted((data / "NG" / "crack").glob("*.png"))[0]
    first_crack.rename(data / "NG" / "crack" / "day2" / first_crack.name)
    (data / "rejects").mkdir()
    shutil.copy(source / "NG" / "ng_000.png", data / "rejects" / "ng_000.png")
    params = replace(BASE,
        data=replace(BASE.data, dir=str(data)),
        validate=replace(BASE.validate, min_per_class=10, cache_dir=str(tmp_path / "cache")),
    )
    lines: list[str] = []
    with pytest.raises(ValidationFailed, match=r"data/rejects/?: unexpected folder"):
        run_validate(params, tmp_path / "reports", report=lines.append)
    report = json.loads((tmp_path / "reports" / "validation-details.json").read_text())
    unexpected = [p["path"] for p in report["failing_files"] if p["rule"] == "no_unexpected_folders"]
    assert unexpected == [str(data / "rejects/")]
    assert [p for p in report["failing_files"] if p["rule"] != "no_unexpected_folders"] == []
    splits = {image.path.relative_to(source).as_posix(): image.split for image in list_images(source, BASE.data)}
    assert report["defect_types"] == {
        kind: {"images": 8, **{split: sum(1 for name in names if splits[f"NG/ng_{name:03d}.png"] == split)
                               for split in ("train", "validation", "test")}}
        for kind, names in (("blowhole", range(1, 24, 3)), ("crack", range(0, 24, 3)),
                            ("untyped", range(2, 24, 3)))
    }
    assert report["classes"] == {"GO": {"images": 24, "fraction": 0.5}, "NG": {"images": 24, "fraction": 0.5}}
    validation = report["defect_types"]
    assert (f"(GO 24, NG 24; defect types: blowhole 8 ({validation['blowhole']['validation']} in validation), "
            f"crack 8 ({validation['crack']['validation']} in validation), "
            f"untyped 8 ({validation['untyped']['validation']} in validation))") in lines[-1]
