"""Fixtures of the gate and registry tests: the session's tiny data set and temp root."""

from pathlib import Path

import pytest


@pytest.fixture
def data_dir(trained_workspace: dict) -> Path:
    return trained_workspace["data_dir"]


@pytest.fixture
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temp root, where champion_support keeps models trained once."""
    return tmp_path_factory.getbasetemp()
