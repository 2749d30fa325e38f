from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from tasks.data import ingest
from tasks.data.dataset import list_images, sha256_of
from tasks.data.image_check import blocking_rules, inspect_image
from tasks.data.ingest import (
    IngestError,
    existing_hashes,
    ingest_batch,
    ingest_lock,
    judge_batch,
    known_hashes,
    recover_interrupted,
)
from tasks.data.manifest import build_manifest
from tasks.data.snapshot import data_snapshot_id
from tasks.durable import cache_file
from tasks.params import Params, replace
from tests.bad_files import HOSTILE_IMAGES
from tests.conftest import BASE, make_image_folder
from tests.dvc_support import make_dvc_repo, run, tree_digest


def params_for(data_dir: Path) -> Params:
    return replace(BASE, data=replace(BASE.data, dir=str(data_dir)))


def verdicts_by_name(verdicts: list[ingest.Verdict]) -> dict[str, ingest.Verdict]:
    return {Path(v.path).name: v for v in verdicts}


@pytest.fixture
def messy_batch(tmp_path: Path) -> tuple[Path, Path]:
    """An existing data set and a batch holding one of every kind of file."""
    data = make_image_folder(tmp_path / "data", per_class=2, seed=1)
    batch = make_image_folder(tmp_path / "batch", per_class=2, seed=2)
    go = batch / "GO"
    shutil.copy(data / "GO" / "go_000.png", go / "again.png")
    shutil.copy(data / "NG" / "ng_000.png", go / "relabeled.png")
    shutil.copy(go / "go_001.png", go / "twice.png")
    (go / "empty.png").write_bytes(b"")
    (go / "cut.png").write_bytes((go / "go_000.png").read_bytes()[:200])
    (go / "readme.txt").write_text("notes")
    (go / ".DS_Store").write_bytes(b"\0")
    Image.new("RGB", (8, 8)).save(go / "tiny.png")
    (go / "link.png").symlink_to(go / "go_000.png")
    (batch / "loose.png").write_bytes((go / "go_000.png").read_bytes())
    (batch / "MAYBE").mkdir()
    (batch / "MAYBE" / "x.png").write_bytes(b"x")
    return data, batch


def test_every_file_gets_a_verdict_with_its_reason(messy_batch: tuple[Path, Path]) -> None:
    data, batch = messy_batch
    verdicts = verdicts_by_name(judge_batch(batch, data, params_for(data), "data"))

    assert {name: v.verdict for name, v in verdicts.items()} == {
        "go_000.png": "accepted", "go_001.png": "accepted",
        "ng_000.png": "accepted", "ng_001.png": "accepted",
        "again.png": "duplicate", "twice.png": "duplicate_in_batch",
        "relabeled.png": "label_conflict", "empty.png": "unreadable", "cut.png": "unreadable",
        "tiny.png": "invalid", "readme.txt": "unexpected", "link.png": "unexpected",
        "loose.png": "unexpected", "MAYBE": "unexpected", ".DS_Store": "ignored",
    }
    assert verdicts["again.png"].reason == "already in the data set as data/GO/go_000.png"
    assert "data/NG/ng_000.png (labeled NG)" in verdicts["relabeled.png"].reason
    assert verdicts["twice.png"].reason == f"same bytes as {batch / 'GO' / 'go_001.png'}"
    assert verdicts["empty.png"].reason == "zero-byte file"
    assert "truncated" in verdicts["cut.png"].reason
    assert "width 8 px outside 16..4096" in verdicts["tiny.png"].reason
    assert "not a class (GO, NG)" in verdicts["MAYBE"].reason
    accepted = verdicts["go_001.png"]
    assert accepted.stored_as == f"data/GO/{sha256_of(batch / 'GO' / 'go_001.png')}.png"


def test_the_same_bytes_in_both_classes_of_a_batch_reject_both(tmp_path: Path) -> None:
    batch = make_image_folder(tmp_path / "batch", per_class=1)
    shutil.copy(batch / "GO" / "go_000.png", batch / "NG" / "copy.png")
    verdicts = verdicts_by_name(judge_batch(batch, tmp_path / "data", params_for(tmp_path), "data"))
    assert verdicts["go_000.png"].verdict == verdicts["copy.png"].verdict == "label_conflict"
    assert str(batch / "NG" / "copy.png") in verdicts["go_000.png"].reason
    assert str(batch / "GO" / "go_000.png") in verdicts["copy.png"].reason


def test_a_batch_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1)
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(IngestError, match="overlaps the data folder"):
        ingest_batch(data / "GO", params_for(Path("data")), tmp_path)


def test_a_second_ingest_at_the_same_time_is_refused(tmp_path: Path) -> None:
    with ingest_lock(tmp_path / "data"), pytest.raises(IngestError, match="another ingest"):
        with ingest_lock(tmp_path / "data"):
            pass


def test_a_copy_failing_half_way_leaves_data_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3, seed=1)
    batch = make_image_folder(tmp_path / "batch", per_class=3, seed=2)
    (tmp_path / ".dvc").mkdir()  # the copy fails before DVC is ever called
    before = tree_digest(data)
    copies = []

    def copy_then_fill_the_disk(source: Path, target: Path, sha256: str) -> None:
        if len(copies) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        copies.append(target)
        shutil.copyfile(source, target)

    monkeypatch.setattr(ingest, "copy_checked", copy_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest_batch(batch, params_for(Path("data")), tmp_path)

    assert len(copies) == 3
    assert tree_digest(data) == before
    assert not list(tmp_path.glob(".fanaoi-ingest-*"))
    assert tree_digest(batch) == tree_digest(make_image_folder(tmp_path / "b2", 3, seed=2))


def test_a_swap_killed_between_renames_is_completed_next_time(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1, seed=1)
    staging = tmp_path / ".fanaoi-ingest-killed"
    shutil.copytree(data, staging / "new")
    (staging / "new" / "GO" / "added.png").write_bytes(b"new image")
    (staging / "complete").touch()
    data.rename(staging / "old")  # the first of the two renames, then the kill

    recover_interrupted(data)

    assert (data / "GO" / "added.png").read_bytes() == b"new image"
    assert not staging.exists()


def test_a_staging_folder_killed_before_completion_is_discarded(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1, seed=1)
    before = tree_digest(data)
    staging = tmp_path / ".fanaoi-ingest-killed"
    (staging / "new" / "GO").mkdir(parents=True)
    (staging / "new" / "GO" / "half.png").write_bytes(b"half")

    recover_interrupted(data)

    assert tree_digest(data) == before
    assert not staging.exists()


@pytest.mark.integration
def test_ingest_copies_under_hash_names_indexes_sources_and_snapshots(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo", tmp_path / "remote")
    batch = make_image_folder(tmp_path / "batch", per_class=3, seed=4)
    (batch / "GO" / "broken.png").write_bytes(b"not a png")
    originals = tree_digest(batch)

    result = ingest_batch(batch, BASE, repo, commit=True)

    assert result["accepted"] == 6 and result["rejected"] == 1
    assert result["snapshot"]["changed"] and result["snapshot"]["pushed"] and result["committed"]
    assert result["snapshot"]["md5"] == data_snapshot_id(repo)
    assert "data.dvc" in run(repo, "git", "show", "--name-only", "HEAD").stdout
    assert tree_digest(batch) == originals
    stored = sorted(p.relative_to(repo / "data").as_posix() for p in (repo / "data").rglob("*.png"))
    assert stored == sorted(
        f"{cls}/{sha256_of(p)}.png" for cls in ("GO", "NG") for p in (batch / cls).glob("*_*.png")
    )
    index = [json.loads(line) for line in (repo / "data" / ".sources.jsonl").read_text().splitlines()]
    assert {Path(entry["source"]).name for entry in index} == {
        f"{c}_{i:03d}.png" for c in ("go", "ng") for i in range(3)
    }
    written = json.loads(Path(result["report_path"]).read_text())
    assert written["counts"] == {"accepted": 6, "unreadable": 1}
    assert written["snapshot"] == result["snapshot"]


def test_hostile_images_get_the_reason_of_the_shared_image_check(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=1, seed=1)
    batch = tmp_path / "batch"
    (batch / "GO").mkdir(parents=True)
    paths = [write(batch / "GO" / name) for name, write in HOSTILE_IMAGES.items()]
    params = params_for(data)

    verdicts = verdicts_by_name(judge_batch(batch, data, params, "data"))

    blocking = blocking_rules(params.validate)
    for path in paths:
        expected = inspect_image(path.read_bytes(), params.validate).rejection(blocking)
        assert verdicts[path.name].reason == expected.reason, path.name
        assert verdicts[path.name].verdict in ("invalid", "unreadable")


@pytest.mark.parametrize("swap", ["symlink", "other bytes"])
def test_a_file_swapped_between_its_check_and_its_copy_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, seed=1)
    batch = make_image_folder(tmp_path / "batch", per_class=2, seed=2)
    (tmp_path / ".dvc").mkdir()  # the copy fails before DVC is ever called
    secret = tmp_path / "passwd"  # stands in for a system file the batch must not leak
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    victim = batch / "GO" / "go_001.png"
    before = tree_digest(data)
    real_add_to_data = ingest.add_to_data

    def swap_then_add(*args: object) -> None:  # the race: after judge_batch, before the copy
        victim.unlink()
        if swap == "symlink":
            victim.symlink_to(secret)
        else:
            shutil.copy(batch / "NG" / "ng_000.png", victim)
        real_add_to_data(*args)

    monkeypatch.setattr(ingest, "add_to_data", swap_then_add)
    expected = "became a symlink after it was checked" if swap == "symlink" else "changed after it was checked"
    with pytest.raises(IngestError, match=expected) as failure:
        ingest_batch(batch, params_for(Path("data")), tmp_path)

    assert str(failure.value).startswith(f"{victim}: ") and "nothing was added" in str(failure.value)
    assert tree_digest(data) == before
    stored = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    assert b"root:x:0:0" not in stored
    assert not list(tmp_path.glob(".fanaoi-ingest-*"))
    (report,) = (tmp_path / "reports" / "ingest").iterdir()
    assert json.loads(report.read_text())["error"] == str(failure.value)


RLIMIT_CHILD = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from tasks.data.ingest import ingest_batch
from flows.params import params_from
ingest_batch(Path(sys.argv[2]), params_from({"data": {"dir": "data"}}), Path(sys.argv[3]), push=False)
"""


def _ingest_with_file_size_limit(limit: int, batch: Path, project: Path) -> str:
    """Run an ingest in a child process whose files cannot grow past ``limit`` bytes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", RLIMIT_CHILD, str(limit), str(batch), str(project)],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


def test_a_full_disk_while_the_report_is_written_names_it_and_changes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    data = make_image_folder(project / "data", per_class=2, seed=1)
    (project / ".dvc").mkdir()
    batch = make_image_folder(tmp_path / "batch", per_class=20, seed=2)
    largest = max(p.stat().st_size for p in batch.rglob("*.png"))
    before = tree_digest(data)

    # Every image fits under the limit; the report of 40 verdicts does not.
    error = _ingest_with_file_size_limit(largest + 1024, batch, project)

    reports = project / "reports" / "ingest"
    assert error.startswith("tasks.data.ingest.IngestError: " + str(reports))
    assert "cannot write the ingest report (File too large); nothing was added" in error
    assert tree_digest(data) == before
    assert list(reports.iterdir()) == []  # no 0-byte or half report, no temp file
    assert not list(project.glob(".fanaoi-ingest-*"))


def test_a_full_disk_while_an_image_is_copied_names_it_and_changes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    data = make_image_folder(project / "data", per_class=2, seed=1)
    (project / ".dvc").mkdir()
    batch = make_image_folder(tmp_path / "batch", per_class=1, seed=2)
    big = batch / "GO" / "big.png"
    Image.effect_noise((160, 160), 60).convert("RGB").save(big)
    before = tree_digest(data)

    error = _ingest_with_file_size_limit(big.stat().st_size // 2, batch, project)

    assert error.startswith(f"tasks.data.ingest.IngestError: {big}: copying it to ")
    assert "(File too large); nothing was added: free space on the disk of" in error
    assert tree_digest(data) == before
    (report,) = (project / "reports" / "ingest").iterdir()
    assert json.loads(report.read_text())["error"] in error


def test_a_full_disk_while_the_index_is_written_names_it_and_changes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    data = make_image_folder(project / "data", per_class=2, seed=1)
    entry = json.dumps({"file": "data/GO/old.png", "source": "/share/" + "x" * 200}) + "\n"
    (data / ".sources.jsonl").write_text(entry * 300)  # ~70 KB: the index of a grown data set
    (project / ".dvc").mkdir()
    batch = make_image_folder(tmp_path / "batch", per_class=1, seed=2)
    before = tree_digest(data)

    # The report and the images fit under the limit; the rewritten index does not.
    error = _ingest_with_file_size_limit(40_000, batch, project)

    assert error.startswith(f"tasks.data.ingest.IngestError: {data / '.sources.jsonl'}: cannot write "
                            f"the new source index")
    assert "(File too large); nothing was added to the data set" in error
    assert tree_digest(data) == before
    assert not list(project.glob(".fanaoi-ingest-*"))


@pytest.mark.integration
def test_ingest_keeps_the_defect_type_subfolder(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo", tmp_path / "remote")
    batch = make_image_folder(tmp_path / "batch", per_class=3, seed=5)
    (batch / "NG" / "crack" / "day2").mkdir(parents=True)
    (batch / "GO" / "line2").mkdir()
    (batch / "NG" / "ng_000.png").rename(batch / "NG" / "crack" / "ng_000.png")
    (batch / "NG" / "ng_001.png").rename(batch / "NG" / "crack" / "day2" / "ng_001.png")
    (batch / "GO" / "go_000.png").rename(batch / "GO" / "line2" / "go_000.png")

    result = ingest_batch(batch, BASE, repo, push=False)

    assert result["accepted"] == 6
    types = {Path(row["path"]).name: row["defect_type"] for row in result["files"]}
    assert types == {"ng_000.png": "crack", "ng_001.png": "crack", "ng_002.png": "untyped",
                     "go_000.png": None, "go_001.png": None, "go_002.png": None}
    stored = sorted(p.relative_to(repo / "data").as_posix() for p in (repo / "data").rglob("*.png"))
    digest = {name: sha256_of(path) for name, path in ((p.name, p) for p in batch.rglob("*.png"))}
    assert stored == sorted([
        f"NG/crack/{digest['ng_000.png']}.png", f"NG/crack/{digest['ng_001.png']}.png",
        f"NG/{digest['ng_002.png']}.png",  # untyped stays directly in NG/
        *(f"GO/{digest[f'go_{i:03d}.png']}.png" for i in range(3)),  # GO subfolders carry no type
    ])
    listed = {image.path.name: image.defect_type for image in list_images(repo / "data", BASE.data)}
    assert listed[f"{digest['ng_001.png']}.png"] == "crack"


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
    real_sha256_of = ingest.sha256_of

    def counting(path: Path) -> str:
        read.append(path.relative_to(data).as_posix())
        return real_sha256_of(path)

    monkeypatch.setattr(ingest, "sha256_of", counting)
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
