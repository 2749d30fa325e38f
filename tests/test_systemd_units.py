"""deploy/systemd/: the unit files of the line's services, parsed and checked against the project."""

from __future__ import annotations

import configparser
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.dvc_support import BIN, PROJECT, tool_env

UNITS = sorted((PROJECT / "deploy" / "systemd").glob("*.service"))
SERVER, WORKER, MODEL = "fanaoi-prefect-server.service", "fanaoi-worker.service", "fanaoi-model.service"
STOP_WITHIN = 30  # seconds from SIGTERM to a stopped service (issue 29: the worker took minutes)


def read_unit(path: Path) -> configparser.ConfigParser:
    # strict: a key given twice is an error here, as a setting overridden by accident would be.
    unit = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return unit


@pytest.fixture(scope="module")
def units() -> dict[str, configparser.ConfigParser]:
    return {path.name: read_unit(path) for path in UNITS}


def test_the_three_services_ship_with_graceful_stop_and_restart(units):
    assert set(units) == {SERVER, WORKER, MODEL}
    for name, unit in units.items():
        service = unit["Service"]
        assert unit["Unit"]["Description"] and unit["Install"]["WantedBy"] == "multi-user.target", name
        assert service["Restart"] in ("on-failure", "always"), name
        assert service["KillSignal"] == "SIGTERM", name
        assert int(service["TimeoutStopSec"]) <= STOP_WITHIN, name
    worker = units[WORKER]["Service"]
    # The worker's own SIGTERM handling waits for its flow runs: the whole control group gets
    # SIGTERM, and SIGKILL after the timeout.
    assert worker["KillMode"] == "control-group" and worker["SendSIGKILL"] == "yes"
    assert SERVER in units[WORKER]["Unit"]["After"].split()


def test_paths_agree_and_every_command_runs_from_the_projects_venv(units):
    folders = {unit["Service"]["WorkingDirectory"] for unit in units.values()}
    assert len(folders) == 1 and {unit["Service"]["User"] for unit in units.values()} == {"fanaoi"}
    venv_bin = PurePosixPath(folders.pop()) / ".venv" / "bin"
    for name, unit in units.items():
        executable, *arguments = shlex.split(unit["Service"]["ExecStart"])
        assert PurePosixPath(executable).parent == venv_bin, name
        program = BIN / PurePosixPath(executable).name
        assert program.name in ("fanaoi", "prefect") and program.is_file(), name
        # --help is eager: it answers 0 only when the command and every option before it exist.
        shown = subprocess.run([str(program), *arguments, "--help"], env=tool_env(), capture_output=True,
                               text=True, timeout=120, check=False)
        assert shown.returncode == 0, f"{name}: {unit['Service']['ExecStart']}\n{shown.stderr[-2000:]}"


def test_the_worker_polls_the_pool_of_prefect_yaml_on_the_servers_port(units):
    worker = units[WORKER]["Service"]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]}
    executable_and_arguments = shlex.split(worker["ExecStart"])
    assert executable_and_arguments[1:3] == ["worker", "start"]
    assert executable_and_arguments[executable_and_arguments.index("--pool") + 1] in pools
    port = yaml.safe_load((PROJECT / "params.yaml").read_text())["server"]["port"]
    assert worker["Environment"] == f"PREFECT_API_URL=http://127.0.0.1:{port}/api"
