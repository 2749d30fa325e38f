"""`fanaoi status` on a project after its first nightly run, as a separate process."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import heavy_packages_imported_by, make_image_folder
from tests.dvc_support import BIN, tool_env
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


def test_status_imports_no_heavy_package() -> None:
    """What keeps it under two seconds: no TensorFlow, Prefect, DVC or GX import."""
    assert heavy_packages_imported_by("from flows.cli import app; import flows.status, tasks.status") == []


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
