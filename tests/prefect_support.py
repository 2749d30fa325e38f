"""A real `prefect server start` for tests: its own process group, PREFECT_HOME and database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dvc_support import BIN, tool_env

# Importing the server's API takes tens of seconds on a busy 2-core machine.
STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 300
STOP_TIMEOUT = 20


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

    def __init__(self, root: Path, database_url: str | None = None) -> None:
        self.home = root / "prefect-home"
        self.home.mkdir()
        self.log = root / "prefect-server.log"
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = prefect_env(
            self.home,
            PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url
            or f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                 "--port", str(port), "--no-ui", "--analytics-off"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a process that reports to this server."""
        return prefect_env(self.home, PREFECT_API_URL=self.api_url, **settings)

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
        if self.process.poll() is None:
            stop_group(self.process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group ``process`` leads (started with ``start_new_session``), then
    SIGKILL it if it is not gone within STOP_TIMEOUT."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


def api(server: PrefectServer, method: str, path: str, body: dict | None = None) -> Any:
    response = httpx.request(method, f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def runs_of(server: PrefectServer, project: Path) -> list[dict[str, Any]]:
    """The nightly flow runs of one project (the session's server holds those of other tests too)."""
    params = str(project / "params.yaml")
    runs = api(server, "POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    return [run for run in runs if run["parameters"].get("params_path") == params]
