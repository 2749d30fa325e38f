"""Alerts: an unusable receiver refused before Prefect is touched; end to end, a real Prefect server
runs the automations and a local receiver gets the POSTs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flows.alerts import FAILED_AUTOMATION, REJECTS_AUTOMATION, WEBHOOK_ENV, alert_target, failed_body
from flows.params import params_from
from tasks.registry.champion import read_champion
from tasks.registry.decisions import read_log
from tests.dvc_support import BIN
from tests.flows.conftest import make_flow_project, update_params
from tests.prefect_support import RUN_TIMEOUT, PrefectServer, api, runs_of

# The server's trigger and action services work on events in the background.
DELIVERY_TIMEOUT = 60


class Receiver:
    """A webhook receiver on a free localhost port: keeps each request's path, JSON body and arrival time."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((time.time(), self.path, json.loads(body) if body else {}))
                self.send_response(204)
                self.end_headers()

            # Any request counts: a test that expects none sees a client that got through.
            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fanaoi"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, text: str) -> tuple[float, dict[str, Any]]:
        """The first POST whose subject contains ``text``."""
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            for arrived, path, body in list(self.received):
                if text in body.get("subject", "") and path == "/hooks/fanaoi":
                    return arrived, body
            time.sleep(0.2)
        raise AssertionError(f"no alert with {text!r} within {DELIVERY_TIMEOUT}s; got {self.received}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    try:
        yield found
    finally:
        found.close()


def fanaoi(server: PrefectServer, project: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), *argv],
        cwd=project, env=server.env(**env), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )


def automation_names(server: PrefectServer) -> list[str]:
    return sorted(a["name"] for a in api(server, "POST", "/automations/filter", {}) if a["name"].startswith("fanaoi"))


# The secret parts of the last one (password, token) must not be printed.
UNUSABLE_URLS = ["not a url", "ftp://hooks.example.com/aoi", "http://", "javascript:alert(1)", "file:///etc/passwd",
                 "http://[::1", "ftp://bot:hunter2@hooks.example.com/aoi?token=s3cret"]


@pytest.mark.integration
@pytest.mark.parametrize("url", UNUSABLE_URLS)
def test_an_unusable_webhook_url_is_refused_before_anything_is_installed(
    receiver: Receiver, tmp_path: Path, url: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("alerts:\n  reject_streak: 3\n")
    # The receiver stands in for the Prefect server: a request reaching it is something installed.
    env = {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": receiver.url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           WEBHOOK_ENV: url}
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "--params", str(params), "alerts"],
                             env=env, capture_output=True, text=True, check=False, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and f"{WEBHOOK_ENV} " in refused.stderr, refused.stderr
    assert "hunter2" not in refused.stderr and "s3cret" not in refused.stderr
    assert receiver.received == []


def test_the_receiver_is_printed_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    alerts = params_from({"alerts": {"webhook_url": "https://bot:hunter2@hooks.example.com/aoi?token=s3cret"}}).alerts
    assert alert_target(alerts) == "webhook https://***@hooks.example.com/aoi?***"


@pytest.mark.parametrize(("ui_url", "link"), [
    ("http://line-7:4200", "Flow run: http://line-7:4200/runs/flow-run/{id} (id {id})"),
    (None, "Flow run: http://line-7:4200/api/flow_runs/{id} (the API's record of the run: set PREFECT_UI_URL"),
])
def test_the_failed_alert_links_the_run_with_or_without_a_ui_url(ui_url: str | None, link: str) -> None:
    from uuid import uuid4

    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.schemas.core import FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template_sync
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    register_user_template_filters(all_filters)  # as the server's notification action does
    run = FlowRun(flow_id=uuid4(), name="fuzzy-heron",
                  state=State(type=StateType.FAILED, name="TimedOut", message="took too long"))
    # The settings of the server process: a UI URL only where it is set (`fanaoi server` sets it).
    unset = {"restore_defaults": {PREFECT_UI_URL, PREFECT_API_URL}}
    with temporary_settings(**({"updates": {PREFECT_UI_URL: ui_url}} if ui_url else unset)):
        body = render_user_template_sync(failed_body("http://line-7:4200/api/"), {"flow_run": run})
    assert "ended TimedOut" in body and "took too long" in body
    assert link.format(id=run.id) in body and "None" not in body


def test_fanaoi_server_tells_the_server_its_ui_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from flows.cli import main

    started: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: started.append(argv))
    for name in ("PREFECT_UI_URL", "PREFECT_UI_API_URL"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, as is what the command sets
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect@127.0.0.1:5432/prefect")
    params = tmp_path / "params.yaml"
    params.write_text("server:\n  host: 127.0.0.1\n  port: 4321\n")

    main(["--params", str(params), "server"])
    assert started and started[0][1:3] == ["server", "start"]
    assert os.environ["PREFECT_UI_URL"] == "http://127.0.0.1:4321"
    assert os.environ["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"


@pytest.mark.integration
@pytest.mark.slow
def test_a_reject_streak_and_a_timed_out_night_each_send_an_alert(
    prefect_server: PrefectServer, receiver: Receiver, tmp_path: Path
) -> None:
    project = make_flow_project(tmp_path)
    # An untrained model (the weights barely move) under an accuracy floor of 1: every night is
    # a rejection, and one is already a streak.
    update_params(project, {"train": {"learning_rate": 1e-12}, "gate": {"min_accuracy": 1.0},
                            "alerts": {"reject_streak": 1}})
    prefect_server.wait_until_healthy()

    for _ in range(2):  # installing again replaces, never duplicates
        installed = fanaoi(prefect_server, project, "alerts", **{WEBHOOK_ENV: receiver.url})
        assert installed.returncode == 0, installed.stderr
    assert automation_names(prefect_server) == sorted([FAILED_AUTOMATION, REJECTS_AUTOMATION])

    rejected = fanaoi(prefect_server, project, "retrain", "--no-push")
    assert rejected.returncode == 0, rejected.stderr[-4000:]
    assert "decision: REJECT" in rejected.stdout and read_champion(project / "registry") is None
    assert [entry["action"] for entry in read_log(project / "registry")] == ["reject"]
    _, alert = receiver.wait_for("candidate rejected 1 nights in a row")
    assert "accuracy" in alert["body"] and "FAIL" in alert["body"]

    # The next night retrains (a changed recipe) but may take one second.
    update_params(project, {"train": {"epochs": 2}, "nightly": {"timeout_seconds": 1}})
    timed_out = fanaoi(prefect_server, project, "retrain", "--no-push")
    assert timed_out.returncode == 1
    assert "nightly.timeout_seconds = 1 s" in timed_out.stderr
    last = runs_of(prefect_server, project)[-1]
    assert (last["state_type"], last["state_name"]) == ("FAILED", "TimedOut")
    arrived, alert = receiver.wait_for(f"FanAOI nightly run TimedOut: {last['name']}")
    assert "nightly.timeout_seconds = 1 s" in alert["body"] and last["id"] in alert["body"]
    assert arrived >= datetime.fromisoformat(last["end_time"]).timestamp()

    # `fanaoi status` reads the same night back from the server.
    status = json.loads(fanaoi(prefect_server, project, "status", "--json").stdout)
    assert status["prefect"]["last_run"]["state_name"] == "TimedOut"
    assert status["prefect"]["last_run"]["decision"] == "failed"

    for automation in api(prefect_server, "POST", "/automations/filter", {}):
        api(prefect_server, "DELETE", f"/automations/{automation['id']}")
