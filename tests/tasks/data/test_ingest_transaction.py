from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from tasks.data import ingest_transaction
from tasks.data.ingest import ingest_batch
from tasks.data.ingest_transaction import IngestError, ingest_lock, recover_interrupted
from tests.conftest import make_image_folder
from tests.dvc_support import tree_digest
from tests.tasks.data.test_ingest import params_for


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

    monkeypatch.setattr(ingest_transaction, "copy_checked", copy_then_fill_the_disk)
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
