"""`fanaoi serve` after `prefect deploy --all`: the work-pool deployment is replaced, not run into a crash.

A real Prefect server (the session's), `prefect deploy` from the repo's prefect.yaml, and
`fanaoi serve` as its own process, as an operator switching from the worker route would.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dvc_support import BIN, PROJECT
from tests.flows.conftest import make_flow_project
from tests.flows.test_ingest_trigger import TERMINAL, wait_for
from tests.prefect_support import RUN_TIMEOUT, PrefectServer, api, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NIGHTLY = "/deployments/name/nightly-retrain/nightly"


def owned_automations(server: PrefectServer, deployment_id: str) -> list[dict[str, Any]]:
    """The automations tied to a deployment (its triggers'; reads do not return owner_resource)."""
    return api(server, "GET", f"/automations/related-to/prefect.deployment.{deployment_id}")


def tool(server: PrefectServer, project: Path, *command: str) -> None:
    result = subprocess.run(command, cwd=project, env=server.env(), capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_serve_replaces_a_work_pool_deployment_and_its_trigger_and_runs_it(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    project = make_flow_project(tmp_path)
    shutil.copytree(PROJECT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "prefect.yaml", project / "prefect.yaml")
    prefect_server.wait_until_healthy()
    tool(prefect_server, project, str(BIN / "prefect"), "work-pool", "create", "fanaoi", "--type", "process",
         "--overwrite")
    tool(prefect_server, project, str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    pooled = api(prefect_server, "GET", NIGHTLY)
    assert pooled["work_pool_name"] == "fanaoi"
    assert len(owned_automations(prefect_server, pooled["id"])) == 1  # prefect.yaml's ingest trigger

    with (tmp_path / "serve.log").open("wb") as log:
        serve = subprocess.Popen(
            [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "serve"],
            cwd=project, env=prefect_server.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        served = wait_for(lambda: httpx.get(prefect_server.api_url + NIGHTLY, timeout=30).json(),
                          lambda found: found.get("id") not in (None, pooled["id"]), 180, "the served deployment")
        assert served["work_pool_name"] is None
        assert httpx.get(f"{prefect_server.api_url}/deployments/{pooled['id']}", timeout=30).status_code == 404
        assert owned_automations(prefect_server, pooled["id"]) == []  # no trigger left for the old one
        assert len(owned_automations(prefect_server, served["id"])) == 1
        log_text = (tmp_path / "serve.log").read_text(errors="replace")
        assert "replaced nightly-retrain/nightly of work pool 'fanaoi'" in log_text

        # The symptom of issue 29: runs crashed looking for flow code in storage at None.
        run = api(prefect_server, "POST", f"/deployments/{served['id']}/create_flow_run", {})
        done = wait_for(lambda: api(prefect_server, "GET", f"/flow_runs/{run['id']}"),
                        lambda found: found["state_type"] in TERMINAL, RUN_TIMEOUT, "the run's end")
        assert done["state_type"] == "COMPLETED", (done["state"], (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        stop_group(serve)
