"""Fixtures for the Prefect flows: one temporary Prefect API and one pipeline project per session.

The first nightly run (which trains) happens once, here; tests that change the project
work on their own copy or undo what they change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.prefect_env import use_offline_defaults

use_offline_defaults()  # before Prefect is imported: no telemetry, patient server start

from tests.conftest import make_image_folder  # noqa: E402
from tests.dvc_support import make_pipeline_repo, run  # noqa: E402
from tests.prefect_support import PrefectServer  # noqa: E402

# Floors low enough that the tiny model is promoted on the first run, so the registry
# outcome is known in advance; short retry delays keep failing tests fast.
FLOW_PARAMS = {
    "gate": {"min_accuracy": 0.0, "max_escape_rate": 1.0},
    "nightly": {"retries": 2, "retry_delay_seconds": 0.5},
}


def update_params(project: Path, changes: dict[str, dict[str, Any]]) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def make_flow_project(root: Path) -> Path:
    """A git + DVC project with the real dvc.yaml, tiny params and a tiny image folder."""
    project = make_pipeline_repo(root / "project", root / "remote")
    update_params(project, FLOW_PARAMS)
    make_image_folder(project / "data", per_class=30, seed=7)
    run(project, "git", "commit", "--quiet", "-am", "flow params")
    return project


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real `prefect server start` for the session, started on first use.

    Its start costs tens of seconds on 2 busy cores, so a test builds its project before
    calling :meth:`PrefectServer.wait_until_healthy`. Tests tell their runs apart by the
    project (``runs_of``), never by counting everything on the server.
    """
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server for the whole session (its start is slow on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def nightly_project(prefect_api: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project after its first nightly run: trained, gated, published as v0001."""
    from flows.nightly import nightly_retrain

    project = make_flow_project(tmp_path_factory.mktemp("nightly"))
    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)
    return {"project": project, "state": state}
