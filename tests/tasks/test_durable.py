import hashlib
from pathlib import Path

import pytest

from tasks.durable import (
    StatKey,
    atomic_write,
    fsync_path,
    read_json,
    replace_path,
    sha256_of,
    stat_hashes,
    stat_key,
    stat_rows,
    write_json,
)


def test_flushes_files_and_folders(tmp_path: Path) -> None:
    model = tmp_path / "model.h5"
    model.write_bytes(b"weights")
    fsync_path(model)
    fsync_path(tmp_path)
    assert model.read_bytes() == b"weights"


def test_a_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "gone")


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "card.json"
    target.write_text("old")

    def fail(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_a_folder_replaces_the_old_folder(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.bin").write_bytes(b"old")
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "new.bin").write_bytes(b"new")
    replace_path(tmp_path / "staged", tmp_path / "export")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["new.bin"]


def test_sha256_of_reads_big_files_in_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 << 20))
    assert sha256_of(big) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


@pytest.mark.parametrize("content", [None, b"{not json", b'{"files": {"a": [1', b"[]", b"null", b"\xff\xfe"],
                         ids=["missing", "not-json", "truncated", "list", "null", "not-utf8"])
def test_read_json_gives_an_empty_object_for_anything_else(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "cache.json"
    if content is not None:
        path.write_bytes(content)
    assert read_json(path) == {}
    write_json(path, {"files": {"a": [1, 2]}}, indent=None)
    assert read_json(path) == {"files": {"a": [1, 2]}}


def test_stat_rows_are_read_by_name_and_refused_whole_if_one_is_misshapen(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    key = stat_key(image.stat())
    assert (key.size, key.inode) == (3, image.stat().st_ino)
    rows = {"a.png": [*key, "0" * 64], "gone.png": [*key, None]}
    assert stat_hashes(stat_rows(rows, 1), 4) == {"a.png": (key, "0" * 64)}
    assert isinstance(stat_hashes(rows, 4)["a.png"][0], StatKey)
    for damaged in ([*key], 7, {"0": 1}):
        assert stat_rows({**rows, "b.png": damaged}, 1) is None
    assert stat_rows(["a.png"], 1) is None
