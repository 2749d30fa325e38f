from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tasks.data import ingest
from tasks.data.dataset import list_images, sha256_of
from tasks.data.image_check import blocking_rules, inspect_image
from tasks.data.ingest import ingest_batch, judge_batch
from tasks.data.ingest_transaction import IngestError
from tasks.data.snapshot import data_snapshot_id
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
    assert error.startswith("tasks.data.ingest_transaction.IngestError: " + str(reports))
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

    assert error.startswith(f"tasks.data.ingest_transaction.IngestError: {big}: copying it to ")
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

    assert error.startswith(f"tasks.data.ingest_transaction.IngestError: {data / '.sources.jsonl'}: cannot write "
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
