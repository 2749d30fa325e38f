"""Retrain on new data: `fanaoi ingest` -> event -> the served deployment's trigger -> one run.

A real Prefect server (the session's), `fanaoi serve` as its own process (the deployment
with its trigger, and the runner that executes its runs), `fanaoi ingest` as another.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from flows.events import BATCH_INGESTED
from tasks.data.snapshot import data_snapshot_id
from tasks.registry.champion import read_champion
from tests.conftest import make_image_folder
from tests.dvc_support import BIN
from tests.flows.conftest import make_flow_project, update_params
from tests.prefect_support import RUN_TIMEOUT, PrefectServer, api, runs_of, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# One ingest takes several seconds on 2 busy cores: the batches must come closer together
# than this for the test's premise ("in a row") to hold.
QUIET_SECONDS = 30
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def served(prefect_server: PrefectServer, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A project whose nightly deployment `fanaoi serve` registers and executes."""
    project = make_flow_project(tmp_path)
    update_params(project, {"nightly": {"project": f"trigger-test-{os.getpid()}",
                                        "ingest_quiet_seconds": QUIET_SECONDS}})
    prefect_server.wait_until_healthy()
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "serve"],
            cwd=project, env=prefect_server.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield project, process
    finally:
        stop_group(process)


def wait_for(read: Any, ready: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if ready(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout}s; last: {value}")


def deployment_of(server: PrefectServer, project: Path) -> dict[str, Any] | None:
    found = api(server, "POST", "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    return next((d for d in found if d["parameters"].get("params_path") == str(project / "params.yaml")), None)


def triggered_runs(server: PrefectServer, project: Path) -> list[dict[str, Any]]:
    """Runs of the project other than those the cron schedule put in the future."""
    return [run for run in runs_of(server, project) if not run["auto_scheduled"]]


def test_batches_in_a_row_start_one_run_after_the_quiet_period(
    prefect_server: PrefectServer, served: tuple[Path, subprocess.Popen], tmp_path: Path
) -> None:
    project, serve = served
    wait_for(lambda: deployment_of(prefect_server, project), bool, 120, "the served deployment")

    snapshots = []
    for number in range(3):
        batch = make_image_folder(tmp_path / f"batch-{number}", per_class=2, seed=100 + number)
        ingest = subprocess.run(
            [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "ingest", str(batch), "--no-push"],
            cwd=project, env=prefect_server.env(), capture_output=True, text=True, timeout=120, check=False,
        )
        assert ingest.returncode == 0, ingest.stderr
        assert "event fanaoi.batch.ingested sent" in ingest.stdout
        assert "Still processing items" not in ingest.stderr  # Prefect's drain, not news for a person
        snapshots.append(data_snapshot_id(project))
    assert serve.poll() is None

    # The server stores events a moment after it receives them (later on a busy machine).
    events = wait_for(lambda: api(prefect_server, "POST", "/events/filter", {"filter": {
        "event": {"name": [BATCH_INGESTED]},
        "resource": {"id": [f"fanaoi.project.trigger-test-{os.getpid()}"]},
    }})["events"], lambda found: len(found) == len(snapshots), 60, "the three events")
    assert sorted(event["payload"]["snapshot"] for event in events) == sorted(snapshots)
    assert {event["payload"]["accepted"] for event in events} == {4}
    occurred = sorted(datetime.fromisoformat(event["occurred"]) for event in events)
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(occurred, occurred[1:], strict=False)]
    assert max(gaps) < QUIET_SECONDS, f"batches {gaps} s apart: not in a row for a {QUIET_SECONDS} s quiet period"
    last_event = occurred[-1]

    (run,) = wait_for(lambda: triggered_runs(prefect_server, project), bool, 120, "a triggered run")
    # The window restarts with each batch: the run comes after the last one, not the first.
    assert (datetime.fromisoformat(run["created"]) - last_event).total_seconds() >= QUIET_SECONDS
    finished = wait_for(lambda: triggered_runs(prefect_server, project), lambda runs: runs[0]["state_type"]
                        in TERMINAL, RUN_TIMEOUT, "the triggered run's end")
    assert finished[0]["state_type"] == "COMPLETED", finished[0]["state"]
    assert read_champion(project / "registry").version == "v0001"  # trained on all three batches
    assert read_champion(project / "registry").card["data_snapshot"] == snapshots[-1]

    # A second window passes with no batch: still one run (training took part of it).
    since_run = (datetime.now(UTC) - datetime.fromisoformat(run["created"])).total_seconds()
    time.sleep(max(0.0, 2 * QUIET_SECONDS + 5 - since_run))
    assert len(triggered_runs(prefect_server, project)) == 1

    # `fanaoi status` reads the same from the server: that run, and the cron's next one.
    status = json.loads(subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "status", "--json"],
        cwd=project, env=prefect_server.env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout)["prefect"]
    assert (status["last_run"]["id"], status["last_run"]["decision"]) == (run["id"], "promote")
    assert status["next_run"]["deployment_id"] == run["deployment_id"]
    assert status["next_run"]["starts_in_seconds"] > 0
