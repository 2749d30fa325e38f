"""The nightly flow against a real `prefect server start`, read back through its API.

The server runs as its own process on a free localhost port, with its own PREFECT_HOME
and SQLite database in the test's folder; `fanaoi retrain` runs in another process with
PREFECT_API_URL pointing at it, as an operator's setup would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.nightly import DEFECT_TYPES_KEY, METRICS_KEY, REPORT_KEY
from tasks.registry import read_champion
from tests.dvc_support import BIN, tool_env
from tests.flows.conftest import make_flow_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Importing the server's API takes tens of seconds on a busy 2-core machine.
STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 300
STOP_TIMEOUT = 20
# Task run states reach the server as events; it records them a moment after the run ends.
SETTLE_TIMEOUT = 30
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NIGHTLY_TASKS = ("pipeline-status", "validate", "snapshot", "train", "evaluate", "gate", "publish", "report")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(home: Path, **settings: str) -> dict[str, str]:
    """This venv's environment without inherited Prefect settings, plus ``settings``."""
    env = {name: value for name, value in tool_env().items() if not name.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **settings}


class PrefectServer:
    """`prefect server start` in its own process group; :meth:`stop` always ends it."""

    def __init__(self, root: Path) -> None:
        self.home = root / "prefect-home"
        self.home.mkdir()
        self.log = root / "prefect-server.log"
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = prefect_env(
            self.home,
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                 "--port", str(port), "--no-ui", "--analytics-off"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prefect server exited {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"prefect server not healthy after {STARTUP_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[PrefectServer]:
    """A server that is starting; the test calls :meth:`PrefectServer.wait_until_healthy`."""
    server = PrefectServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def api(server: PrefectServer, method: str, path: str, body: dict | None = None) -> Any:
    response = httpx.request(method, f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


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
        cwd=project, env=prefect_env(prefect_server.home, PREFECT_API_URL=prefect_server.api_url),
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert retrain.returncode == 0, retrain.stderr[-4000:]
    assert "decision: PROMOTE" in retrain.stdout
    assert read_champion(project / "registry").version == "v0001"

    # The server holds the run: one flow run of nightly-retrain, completed, with its tasks.
    (flow_run,) = api(prefect_server, "POST", "/flow_runs/filter", {})
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
    gate = json.loads((project / "reports" / "gate.json").read_text())
    rows = {row["metric"]: row for row in json.loads(table["data"])}
    assert rows["accuracy"]["candidate"] == round(gate["candidate"]["metrics"]["accuracy"], 4)
