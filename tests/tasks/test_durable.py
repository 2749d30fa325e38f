from pathlib import Path

import pytest

from tasks.durable import fsync_path


def test_flushes_files_and_folders(tmp_path: Path) -> None:
    model = tmp_path / "model.h5"
    model.write_bytes(b"weights")
    fsync_path(model)
    fsync_path(tmp_path)
    assert model.read_bytes() == b"weights"


def test_a_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "gone")
