from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from tasks.data import data_hashes
from tasks.data.data_hashes import existing_hashes, known_hashes
from tasks.data.dataset import sha256_of
from tasks.data.ingest import ingest_batch, judge_batch
from tasks.data.manifest import build_manifest
from tasks.durable import cache_file
from tests.conftest import BASE, make_image_folder
from tests.dvc_support import make_dvc_repo
from tests.tasks.data.test_ingest import params_for, verdicts_by_name


def stored_png(path: Path, shade: int) -> bytes:
    """A 32x32 PNG stored without compression: every shade gives a file of the same size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (shade, 255 - shade, 90)).save(path, compress_level=0)
    return path.read_bytes()


def rewrite_keeping_size_and_mtime(path: Path, shade: int) -> bytes:
    """Other bytes of the same size written in place, the mtime set back (same inode)."""
    before = path.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the ctime moves
    other = path.with_name(f"other-{path.name}")
    content = stored_png(other, shade)
    other.unlink()
    with path.open("r+b") as handle:
        handle.write(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns
    return path.read_bytes()


def count_reads(monkeypatch: pytest.MonkeyPatch, data: Path) -> list[str]:
    """The files of ``data`` the duplicate check reads, as paths inside it."""
    read: list[str] = []
    real_sha256_of = data_hashes.sha256_of

    def counting(path: Path) -> str:
        read.append(path.relative_to(data).as_posix())
        return real_sha256_of(path)

    monkeypatch.setattr(data_hashes, "sha256_of", counting)
    return read


def test_validated_hashes_serve_the_duplicate_check_but_a_changed_added_or_removed_file_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / ".fanaoi"
    params = params_for(data)
    old = stored_png(data / "GO" / "rewritten.png", 10)
    gone = stored_png(data / "GO" / "removed.png", 20)
    for index in range(3):
        stored_png(data / "NG" / f"kept_{index}.png", 30 + index)
    build_manifest(data, params.data, params.validate, cache)
    new = rewrite_keeping_size_and_mtime(data / "GO" / "rewritten.png", 40)
    added = stored_png(data / "NG" / "added.png", 50)
    (data / "GO" / "removed.png").unlink()
    batch = tmp_path / "batch"
    for name, content in {"GO/new_bytes.png": new, "NG/old_bytes.png": old,
                          "GO/added_bytes.png": added, "GO/removed_bytes.png": gone}.items():
        (batch / name).parent.mkdir(parents=True, exist_ok=True)
        (batch / name).write_bytes(content)
    read = count_reads(monkeypatch, data)

    in_data = existing_hashes(data, params.data.classes, "data", known_hashes(cache, data))
    verdicts = verdicts_by_name(judge_batch(batch, data, params, "data", in_data))

    assert sorted(read) == ["GO/rewritten.png", "NG/added.png"]  # the three kept ones from the cache
    assert in_data.read == 2 and len(in_data.files) == 5
    assert verdicts["new_bytes.png"].verdict == "duplicate"
    assert verdicts["new_bytes.png"].reason == "already in the data set as data/GO/rewritten.png"
    assert verdicts["old_bytes.png"].verdict == "accepted"  # its bytes left the data set
    assert verdicts["added_bytes.png"].verdict == "label_conflict"
    assert "data/NG/added.png (labeled NG)" in verdicts["added_bytes.png"].reason
    assert verdicts["removed_bytes.png"].verdict == "accepted"


@pytest.mark.integration
def test_an_ingest_records_the_hashes_of_the_folder_it_swapped_in_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_dvc_repo(tmp_path / "repo", None)
    data = repo / "data"
    first = tmp_path / "first"
    old = stored_png(first / "GO" / "a.png", 10)
    kept = stored_png(first / "GO" / "b.png", 20)
    stored_png(first / "NG" / "c.png", 30)
    ingest_batch(first, BASE, repo, push=False)
    victim = data / "GO" / f"{sha256_of(first / 'GO' / 'a.png')}.png"
    new = rewrite_keeping_size_and_mtime(victim, 70)
    second = tmp_path / "second"
    for name, content in {"GO/kept.png": kept, "NG/old_bytes.png": old, "GO/new_bytes.png": new}.items():
        (second / name).parent.mkdir(parents=True, exist_ok=True)
        (second / name).write_bytes(content)
    read = count_reads(monkeypatch, data)

    result = ingest_batch(second, BASE, repo, push=False)

    assert read == [victim.relative_to(data).as_posix()]  # the rest as the first ingest recorded it
    verdicts = {Path(row["path"]).name: row for row in result["files"]}
    assert verdicts["kept.png"]["verdict"] == "duplicate"
    assert verdicts["new_bytes.png"]["reason"] == f"already in the data set as data/GO/{victim.name}"
    assert verdicts["old_bytes.png"]["verdict"] == "accepted"


@pytest.mark.parametrize("manifest, recorded", [
    ({"header": {"version": 5}, "files": {"GO/go_000.png": 7}},
     {"version": 1, "files": ["GO/go_000.png"]}),
    ({"header": {"version": 5}, "files": {"GO/go_000.png": {"5": "0" * 64}}},
     {"version": 1, "files": {"GO/go_000.png": [1, 2]}}),
    ({"header": 5, "files": {}}, []),
    ('{"header": {"version": 5}, "fi', '{"version": 1, "files": {"GO/go_'),
], ids=["row-not-a-list", "row-an-object", "not-an-object", "truncated"])
def test_damaged_hash_records_are_ignored_and_every_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: object, recorded: object,
) -> None:
    data, cache = make_image_folder(tmp_path / "data", per_class=2), tmp_path / ".fanaoi"
    params = params_for(data)
    build_manifest(data, params.data, params.validate, cache)
    for kind, damage in (("manifest", manifest), ("ingest-hashes", recorded)):
        cache_file(cache, data, kind).write_text(damage if isinstance(damage, str) else json.dumps(damage))
    read = count_reads(monkeypatch, data)

    in_data = existing_hashes(data, params.data.classes, "data", known_hashes(cache, data))

    assert sorted(read) == ["GO/go_000.png", "GO/go_001.png", "NG/ng_000.png", "NG/ng_001.png"]
    assert {sha for _, sha in in_data.files.values()} == {sha256_of(p) for p in data.rglob("*.png")}
