import json
import os
import shutil

import pytest
from PIL import Image

from tasks.data.dataset import assign_split, sha256_of
from tasks.data.manifest import build_manifest, inspect_file
from tasks.params import replace
from tests.bad_files import (
    good_image,
    write_bomb_png,
    write_corrupt_png,
    write_text_as_png,
    write_truncated_jpeg,
    write_zero_byte,
)
from tests.conftest import BASE, make_image_folder

LIMITS = replace(BASE.validate, max_pixels=1_000_000)


def test_inspect_good_image(tmp_path):
    path = tmp_path / "fan.png"
    good_image().save(path)
    check = inspect_file(path, LIMITS)
    assert check.decodable and check.error is None
    assert (check.width, check.height, check.mode, check.format) == (32, 32, "RGB", "PNG")
    assert check.bytes == path.stat().st_size
    assert check.sha256 == sha256_of(path)
    assert len(check.dhash) == 64 and 20 < check.brightness < 200


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("corrupt.png", write_corrupt_png, "corrupt"),
        ("truncated.jpg", write_truncated_jpeg, "truncated"),
        ("empty.png", write_zero_byte, "zero-byte file"),
        ("notes.png", write_text_as_png, "not an image"),
        # Pillow raises above twice its limit and warns between once and twice.
        ("bomb.png", lambda p: write_bomb_png(p, 2000), "decompression bomb: 4,000,000 pixels"),
        ("big.png", lambda p: write_bomb_png(p, 1100), "decompression bomb: 1,210,000 pixels"),
    ],
)
def test_inspect_bad_file_reports_why_and_leaves_it(tmp_path, name, write, reason):
    path = write(tmp_path / name)
    before = path.read_bytes()
    limit = Image.MAX_IMAGE_PIXELS
    check = inspect_file(path, LIMITS)
    assert not check.decodable
    assert reason in check.error
    assert check.sha256 is not None and check.bytes == len(before)
    assert path.read_bytes() == before
    assert Image.MAX_IMAGE_PIXELS == limit


def test_inspect_unreadable_path(tmp_path):
    check = inspect_file(tmp_path / "gone.png", LIMITS)
    assert not check.decodable and "cannot read the file" in check.error


def test_manifest_rows_mirror_what_training_reads(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "GO" / "notes.txt").write_text("x")
    (data / "GO" / ".DS_Store").write_text("x")
    (data / "README.md").write_text("x")
    (data / "scrap").mkdir()
    (data / "scrap" / "a.png").write_text("x")
    (data / "GO" / "deeper").mkdir()
    shutil.copy(data / "GO" / "go_000.png", data / "GO" / "deeper" / "again.png")
    os.symlink(tmp_path / "elsewhere.png", data / "NG" / "outside.png")
    os.symlink(data / "GO" / "go_001.png", data / "NG" / "inside.png")
    params = replace(BASE.data, dir=str(data))

    manifest = build_manifest(data, params, LIMITS).set_index("path")

    kinds = manifest["kind"].to_dict()
    assert {p for p, k in kinds.items() if k == "image"} == {
        "GO/go_000.png", "GO/go_001.png", "GO/go_002.png", "GO/deeper/again.png",
        "NG/ng_000.png", "NG/ng_001.png", "NG/ng_002.png", "NG/inside.png",
    }
    assert kinds["GO/notes.txt"] == "other_file"
    assert kinds["README.md"] == "loose_file"
    assert kinds["scrap/"] == "unexpected_folder"
    assert manifest.loc["scrap/", "detail"] == "1 file(s)"
    assert kinds["NG/outside.png"] == "outside_link"
    assert manifest.loc["NG/outside.png", "detail"] == str(tmp_path / "elsewhere.png")
    assert "GO/.DS_Store" not in kinds
    row = manifest.loc["GO/go_000.png"]
    assert row["class_name"] == "GO" and row["decodable"]
    assert row["split"] == assign_split(row["sha256"], params.split_salt, params.split)


def test_cache_decodes_only_new_or_changed_files(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10)
    params = replace(BASE.data, dir=str(data))
    cache = tmp_path / "cache"

    first = build_manifest(data, params, LIMITS, cache)
    again = build_manifest(data, params, LIMITS, cache)
    assert first.attrs["inspected"] == 20 and again.attrs["inspected"] == 0
    assert again.equals(first)

    make_image_folder(tmp_path / "more", per_class=2, seed=5)
    shutil.copy(tmp_path / "more" / "NG" / "ng_000.png", data / "NG" / "new.png")
    write_truncated_jpeg(data / "GO" / "go_003.png")  # same name, new bytes
    grown = build_manifest(data, params, LIMITS, cache).set_index("path")
    assert grown.attrs["inspected"] == 2
    assert "truncated" in grown.loc["GO/go_003.png", "error"]
    assert grown.loc["NG/new.png", "decodable"]

    # a new limit changes verdicts
    stricter = build_manifest(data, params, replace(BASE.validate, max_pixels=500), cache)
    assert stricter.attrs["inspected"] == 21
    assert not stricter["decodable"].any()


def damage_rows(text: str, damage) -> str:
    stored = json.loads(text)
    stored["files"] = {path: damage(row) for path, row in stored["files"].items()}
    return json.dumps(stored)


@pytest.mark.parametrize("damage", [
    lambda text: "{not json",
    lambda text: text[: len(text) // 2],
    lambda text: "[]",
    lambda text: damage_rows(text, lambda row: 7),
    lambda text: damage_rows(text, lambda row: row[:3]),
    lambda text: damage_rows(text, lambda row: dict(enumerate(row))),
], ids=["not-json", "truncated", "not-an-object", "row-not-a-list", "row-too-short", "row-an-object"])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    data = make_image_folder(tmp_path / "data", per_class=2)
    cache = tmp_path / "cache"
    build_manifest(data, replace(BASE.data, dir=str(data)), LIMITS, cache)
    (cached,) = cache.iterdir()
    cached.write_text(damage(cached.read_text()))
    manifest = build_manifest(data, replace(BASE.data, dir=str(data)), LIMITS, cache)
    assert manifest.attrs["inspected"] == 4 and manifest["decodable"].all()


def test_workers_inspect_as_one_process_does(tmp_path, monkeypatch):
    import tasks.data.manifest

    data = make_image_folder(tmp_path / "data", per_class=15)
    write_truncated_jpeg(data / "GO" / "cut.jpg")
    params = replace(BASE.data, dir=str(data))
    alone = build_manifest(data, params, LIMITS)
    monkeypatch.setattr(tasks.data.manifest, "_FILES_PER_WORKER", 10)  # 31 files: two workers
    shared = build_manifest(data, params, LIMITS)
    assert shared.attrs["inspected"] == 31 and shared.equals(alone)
