"""`fanaoi status` on a project after its first nightly run, as a separate process."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from flows.cli.formatting import status_lines
from flows.status import nightly_runs, ui_url
from tests.conftest import heavy_packages_imported_by, make_image_folder
from tests.dvc_support import BIN, tool_env
from tests.http_support import fake_api
from tests.prefect_support import free_port

pytestmark = pytest.mark.integration


def status(project: Path, *extra: str, api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in tool_env().items() if not name.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(project.parent / "prefect-home")  # no profile with a server in it
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "status", *extra],
        cwd=project, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def status_json(project: Path, api_url: str | None = None) -> dict[str, Any]:
    result = status(project, "--json", api_url=api_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def checks(state: dict[str, Any]) -> dict[str, bool]:
    return {check["check"]: check["ok"] for check in state["agreement"]}


def test_after_the_first_run_everything_agrees(nightly_project: dict[str, Any]) -> None:
    project = nightly_project["project"]
    state = status_json(project)

    champion = state["champion"]
    assert champion["version"] == "v0001" and champion["problem"] is None
    assert 0 <= champion["age_seconds"] < 3600
    assert set(champion["metrics"]) >= {"accuracy", "escape_rate", "overkill_rate"}
    assert 0 <= champion["threshold"] <= 1
    assert state["data"]["snapshot"] == state["data"]["trained_snapshot"] == champion["data_snapshot"]
    assert state["data"]["pending_batches"] == []
    assert checks(state) == {"data/ = data.dvc": True, "data.dvc = dvc.lock": True, "registry = dvc.lock": True}
    assert state["prefect"] == {"server": None, "error": "no Prefect server (PREFECT_API_URL is not set)"}

    text = status(project).stdout
    assert text.splitlines()[0].startswith("champion    v0001  published ")
    assert "no Prefect server" in text and "DISAGREE" not in text


def test_a_server_that_is_down_is_reported_not_waited_for(nightly_project: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    state = status_json(nightly_project["project"], api_url=url)
    assert state["prefect"]["server"] == url
    assert state["prefect"]["error"].startswith(f"no Prefect server at {url} (ConnectError")


def test_the_last_run_shows_its_state_name_and_its_page(nightly_project: dict[str, Any]) -> None:
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()  # the session's temporary Prefect server, which ran the first night
    last = status_json(nightly_project["project"], api_url=api_url)["prefect"]["last_run"]
    assert last["url"] == f"{api_url.removesuffix('/api')}/runs/flow-run/{last['id']}"
    lines = status(nightly_project["project"], api_url=api_url).stdout.splitlines()
    shown = next(number for number, line in enumerate(lines) if line.startswith("last night"))
    assert lines[shown].startswith(f"last night  {last['state_name']}  started ")
    assert lines[shown + 1] == f"{'':12}{last['url']}"


def test_status_shows_a_timed_out_night_as_such_and_the_last_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    run = {"id": "0a1b", "state": "FAILED", "state_name": "TimedOut", "start": "2026-12-02T02:00:04Z",
           "duration_seconds": 14400.0, "decision": "failed", "message": "the run took longer than ...",
           "url": "http://line-7:4200/runs/flow-run/0a1b"}
    rejected = {"time": "2026-12-01T02:14:03+00:00", "action": "reject", "version": None,
                "reasons": ["accuracy 0.98: ok"], "failed": ["escape_rate 0.0210 <= 0.0200: FAIL"]}
    state = {
        "champion": None, "agreement": [], "last_reject": rejected,
        "prefect": {"server": "http://line-7:4200/api", "error": None, "last_run": run, "next_run": None},
        "data": {"problems": {}, "snapshot": None, "trained_snapshot": None, "pending_batches": []},
    }
    lines = dict(status_lines(state))
    assert lines["last night"].startswith("TimedOut  started 2026-12-02T02:00:04Z  took 4 h  decision failed")
    assert lines[""] == "http://line-7:4200/runs/flow-run/0a1b"
    assert lines["last reject"] == "2026-12-01T02:14:03+00:00: escape_rate 0.0210 <= 0.0200: FAIL"

    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", "/nonexistent")  # no profile
    assert ui_url("http://line-7:4200/api/") == "http://line-7:4200"
    monkeypatch.setenv("PREFECT_UI_URL", "https://prefect.line-7.example/")  # behind a proxy
    assert ui_url("http://line-7:4200/api") == "https://prefect.line-7.example"


def test_status_imports_no_heavy_package() -> None:
    """What keeps it under two seconds: no TensorFlow, Prefect, DVC or GX import."""
    assert heavy_packages_imported_by("from flows.cli import app; import flows.status, flows.project_status") == []


def test_an_ingested_batch_shows_until_a_run_trains_on_it(
    nightly_project: dict[str, Any], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(nightly_project["project"], project, symlinks=True)
    batch = make_image_folder(tmp_path / "batch-0412", per_class=3, seed=99)
    ingest = subprocess.run(
        [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "ingest", str(batch), "--no-push"],
        cwd=project, env=tool_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert ingest.returncode == 0, ingest.stderr

    state = status_json(project)
    (pending,) = state["data"]["pending_batches"]
    assert pending["batch"] == str(batch) and pending["images"] == 6
    assert state["data"]["snapshot"] != state["data"]["trained_snapshot"]
    assert checks(state) == {"data/ = data.dvc": True, "data.dvc = dvc.lock": False, "registry = dvc.lock": True}
    text = status(project).stdout
    assert "batch-0412 (6 images, " in text and "DISAGREE    data.dvc = dvc.lock: " in text

    # A file dropped into data/ by hand, without a snapshot: data.dvc no longer describes data/.
    shutil.copy(next((batch / "GO").iterdir()), project / "data" / "GO" / "by-hand.png")
    assert checks(status_json(project))["data/ = data.dvc"] is False
    # It may be broken: status never advises snapshotting what no check has read.
    assert "`fanaoi validate` checks them, then `fanaoi snapshot` records them" in status(project).stdout


NOT_PREFECT = {
    "html": (b"<html><body>It works!</body></html>", "text/html", "/flow_runs/filter answered text/html, not JSON"),
    "an empty object": (b"{}", "application/json", "/flow_runs/filter answered: Input should be a valid list"),
    "a list of strings": (b'["a"]', "application/json", "answered: 0: Input should be a valid dictionary"),
}


@pytest.mark.parametrize(("body", "content_type", "said"), NOT_PREFECT.values(), ids=NOT_PREFECT.keys())
def test_a_server_that_is_not_prefect_is_one_line(body: bytes, content_type: str, said: str) -> None:
    with fake_api(body, content_type) as url:
        state = nightly_runs(url, 2.0, datetime.now(UTC))
    assert state["error"].startswith(f"the server at {url} is not a Prefect API (")
    assert said in state["error"] and "check PREFECT_API_URL" in state["error"]
    assert "\n" not in state["error"]


def test_a_malformed_api_url_is_one_line() -> None:
    state = nightly_runs("http://[::1", 0.5, datetime.now(UTC))
    error = "no Prefect server at http://[::1 (InvalidURL: Invalid port: ':1')"
    assert state == {"server": "http://[::1", "error": error}


def test_a_trickling_server_is_cut_at_the_deadline_of_the_whole_exchange() -> None:
    with fake_api(b"[]", trickle=0.3) as url:
        started = time.monotonic()
        state = nightly_runs(url, 0.5, datetime.now(UTC))
        took = time.monotonic() - started
    assert took < 1.0  # status.api_timeout for all requests together, plus the loop's start
    assert state["error"] == (f"the Prefect server at {url} did not answer within status.api_timeout = 0.5 s "
                              "(params.yaml); check that it is up and not overloaded")
