"""The nightly flow against a real `prefect server start`, read back through its API.

The server runs as its own process on a free localhost port, with its own PREFECT_HOME
and SQLite database (one per session: tests/flows/conftest.py); `fanaoi retrain` runs in
another process with PREFECT_API_URL pointing at it, as an operator's setup would.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from flows.nightly import DEFECT_TYPES_KEY, METRICS_KEY, REPORT_KEY
from tasks.registry.champion import read_champion
from tests.dvc_support import BIN
from tests.flows.conftest import make_flow_project
from tests.prefect_support import RUN_TIMEOUT, PrefectServer, api, runs_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Task run states reach the server as events; it records them a moment after the run ends.
SETTLE_TIMEOUT = 30
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NIGHTLY_TASKS = ("pipeline-status", "validate", "snapshot", "train", "evaluate", "gate", "publish", "explain", "report")


def settled_task_states(server: PrefectServer, flow_run_id: str) -> dict[str, str]:
    """State type by task name, once every task of the nightly flow has a final state."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        runs = api(server, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        states = {run["name"].rsplit("-", 1)[0]: run["state_type"] for run in runs}
        settled = set(NIGHTLY_TASKS) <= states.keys() and set(states.values()) <= TERMINAL
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_nightly_run_is_recorded_by_a_real_prefect_server(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    project = make_flow_project(tmp_path)  # built while the server starts
    prefect_server.wait_until_healthy()

    retrain = subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "retrain", "--no-push"],
        cwd=project, env=prefect_server.env(),
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert retrain.returncode == 0, retrain.stderr[-4000:]
    assert "decision: PROMOTE" in retrain.stdout
    assert read_champion(project / "registry").version == "v0001"

    # The server holds the run: one flow run of nightly-retrain, completed, with its tasks.
    (flow_run,) = runs_of(prefect_server, project)
    assert api(prefect_server, "GET", f"/flows/{flow_run['flow_id']}")["name"] == "nightly-retrain"
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
    assert settled_task_states(prefect_server, flow_run["id"]) == dict.fromkeys(NIGHTLY_TASKS, "COMPLETED")

    # Its artifacts, found by flow run and by their stable keys (the dashboard's history).
    in_run = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    found = {a["key"]: a for a in api(prefect_server, "POST", "/artifacts/filter", in_run)}
    assert found.keys() == {REPORT_KEY, METRICS_KEY, DEFECT_TYPES_KEY}
    report = api(prefect_server, "GET", f"/artifacts/{REPORT_KEY}/latest")
    assert report["flow_run_id"] == flow_run["id"] and report["type"] == "markdown"
    assert report["data"] == found[REPORT_KEY]["data"]
    assert "# Nightly retrain: PROMOTE" in report["data"]
    table = api(prefect_server, "GET", f"/artifacts/{METRICS_KEY}/latest")
    assert table["flow_run_id"] == flow_run["id"] and table["type"] == "table"
    gate = json.loads((project / "reports" / "gate-details.json").read_text())
    rows = {row["metric"]: row for row in json.loads(table["data"])}
    assert rows["accuracy"]["candidate"] == round(gate["candidate"]["metrics"]["accuracy"], 4)
