"""The production topology on one machine: a Prefect server on PostgreSQL (`fanaoi server`),
the data engineer's copy of the project, and a worker's own clone of it, as a second
machine would have; both copies publish to one shared registry folder.

Every piece is a real process: postgres (initdb + pg_ctl in a temp folder), the server,
`prefect deploy` from prefect.yaml, `prefect worker start --run-once` on a process pool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.registry.champion import read_champion
from tests.dvc_support import BIN, PROJECT, run
from tests.flows.conftest import make_flow_project, update_params
from tests.postgres_support import Postgres, postgres_bin
from tests.prefect_support import RUN_TIMEOUT, PrefectServer, api, free_port, prefect_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    bin_dir, why = postgres_bin()
    if bin_dir is None:
        pytest.skip(why)
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv to start PostgreSQL as the postgres user")
    cluster = Postgres(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class FanaoiServer(PrefectServer):
    """`fanaoi server` (the `prefect server start` it becomes) on the PostgreSQL database."""

    def __init__(self, root: Path, project: Path, database_url: str) -> None:
        self.home = root / "prefect-home"
        self.home.mkdir()
        self.log = root / "fanaoi-server.log"
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        update_params(project, {"server": {"port": port}})
        env = prefect_env(self.home, PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url, PREFECT_UI_ENABLED="false")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "server"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )


def tool(server: PrefectServer, cwd: Path, *command: str, timeout: float = 120) -> str:
    result = subprocess.run(command, cwd=cwd, env=server.env(), capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_a_worker_with_its_own_clone_runs_the_deployment_on_a_postgres_server(
    postgres: Postgres, tmp_path: Path
) -> None:
    # The data engineer's copy: the project with its flows and prefect.yaml, a shared registry.
    shared_registry = tmp_path / "shared" / "registry"
    project = make_flow_project(tmp_path / "line")
    shutil.copytree(PROJECT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "prefect.yaml", project / "prefect.yaml")
    update_params(project, {"registry": {"dir": str(shared_registry)}})
    server = FanaoiServer(tmp_path, project, postgres.url)
    try:
        run(project, str(BIN / "fanaoi"), "snapshot", "--commit")  # data.dvc in git, data in the DVC remote
        run(project, "git", "add", "--all")
        run(project, "git", "commit", "--quiet", "-m", "flows, prefect.yaml, shared registry")

        # The worker's machine: its own clone, the data from the DVC remote.
        worker_copy = tmp_path / "gpu-box" / "fanaoi"
        run(tmp_path, "git", "clone", "--quiet", str(project), str(worker_copy))
        run(worker_copy, str(BIN / "dvc"), "pull", "--quiet", "data.dvc")
        server.wait_until_healthy()
        assert f"Prefect server on PostgreSQL at 127.0.0.1:{postgres.port}/prefect" in server.output()

        tool(server, worker_copy, str(BIN / "prefect"), "work-pool", "create", "fanaoi", "--type", "process")
        tool(server, worker_copy, str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
        flow_run = json.loads(tool(server, worker_copy, str(BIN / "python"), "-c", (
            "import json; from prefect.deployments import run_deployment;"
            "r = run_deployment('nightly-retrain/nightly', timeout=0);"
            "print(json.dumps({'id': str(r.id)}))"
        )).splitlines()[-1])
        tool(server, worker_copy, str(BIN / "prefect"), "worker", "start", "--pool", "fanaoi",
             "--run-once", "--limit", "1", timeout=RUN_TIMEOUT)

        done = api(server, "GET", f"/flow_runs/{flow_run['id']}")
        assert done["state_type"] == "COMPLETED", done["state"]
        # Published to the shared folder, where the data engineer's copy reads it.
        champion = read_champion(shared_registry)
        assert champion.version == "v0001" and champion.problem is None
        status = json.loads(tool(server, project, str(BIN / "fanaoi"), "status", "--json"))
        assert status["champion"]["version"] == "v0001"
        assert status["prefect"]["last_run"]["id"] == flow_run["id"]
        assert (worker_copy / "dvc.lock").is_file() and not (project / "dvc.lock").exists()
    finally:
        server.stop()
