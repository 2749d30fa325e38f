"""Wall time of a nightly run with nothing changed (target <= 10 s), and of a full run.

In a throwaway git + DVC project (the real dvc.yaml, a local DVC remote, its own
PREFECT_HOME, so Prefect's ephemeral API keeps its SQLite file there):

1. `fanaoi retrain` once: every stage runs (the full run);
2. `fanaoi retrain` again ``--runs`` times with nothing changed: every stage is skipped.

Each run is the whole command in a new process, as cron or `make retrain` starts it:
Python start, imports, Prefect's ephemeral API (or ``--api-url``), the flow, its artifacts.

Without ``--data``: the flow tests' tiny project (30 images per class, 32x32 model), a
quick check. With ``--data DIR``: a copy of that data set and the repository's params.yaml
(the real model), e.g. after `fanaoi demo-data /tmp/demo`.

    python bench/nightly_run.py [--data DIR] [--runs 3] [--no-push] [--api-url URL] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dvc_support import BIN, PROJECT, make_pipeline_repo, run, tool_env  # noqa: E402
from tests.flows.conftest import make_flow_project  # noqa: E402

NO_CHANGE_TARGET = 10.0


def make_project(root: Path, data: Path | None) -> Path:
    """The tiny flow-test project, or one holding ``data`` with the repository's params."""
    if data is None:
        return make_flow_project(root)
    project = make_pipeline_repo(root / "project", root / "remote")
    shutil.copy(PROJECT / "params.yaml", project / "params.yaml")
    shutil.copytree(data, project / "data")
    run(project, "git", "commit", "--quiet", "-am", "repository params")
    return project


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def retrain(project: Path, env: dict[str, str], push: bool) -> tuple[float, float, str]:
    """Wall and CPU seconds of one `fanaoi retrain` process (with its children), and its decision.

    CPU seconds tell a slow machine from a busy one: on a shared machine wall time grows
    with the load, CPU time much less.
    """
    command = [str(BIN / "fanaoi"), "--params", str(project / "params.yaml"), "retrain"]
    cpu, started = child_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command + ([] if push else ["--no-push"]), cwd=project, env=env,
                            capture_output=True, text=True, check=False)
    seconds, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu
    if result.returncode != 0:
        raise SystemExit(f"fanaoi retrain exited {result.returncode}:\n{result.stderr[-3000:]}")
    decision = next(line for line in result.stdout.splitlines() if line.startswith("decision:"))
    return seconds, cpu, decision


def run_benchmark(root: Path, data: Path | None, runs: int, push: bool, api_url: str | None) -> None:
    project = make_project(root, data)
    images = sum(1 for path in (project / "data").rglob("*") if path.is_file())
    env = {name: value for name, value in tool_env().items() if not name.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    where = f"Prefect API {api_url}" if api_url else "Prefect's ephemeral API"
    print(f"project {project}: {images} images, {where}, dvc push {'on' if push else 'off'}")

    full, cpu, decision = retrain(project, env, push)
    print(f"full run (every stage): {full:.1f} s wall, {cpu:.1f} s CPU  [{decision}]")
    times, cpus = [], []
    for _ in range(runs):
        seconds, cpu, decision = retrain(project, env, push)
        if not decision.startswith("decision: UNCHANGED"):
            raise SystemExit(f"a run with nothing changed did work: {decision}")
        times.append(seconds)
        cpus.append(cpu)
    no_change = statistics.median(times)
    verdict = "within" if no_change <= NO_CHANGE_TARGET else "OVER"
    print(f"no-change run: {no_change:.1f} s wall, {statistics.median(cpus):.1f} s CPU (median of "
          f"{runs}; wall {', '.join(f'{t:.1f}' for t in times)}); target {NO_CHANGE_TARGET:.0f} s, "
          f"ratio {no_change / NO_CHANGE_TARGET:.2f} ({verdict})")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="data set to copy in (GO/, NG/); default: tiny")
    parser.add_argument("--runs", type=int, default=3, help="no-change runs (median)")
    parser.add_argument("--no-push", action="store_true", help="skip dvc push in every run")
    parser.add_argument("--api-url", help="a running Prefect server instead of the ephemeral API")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: temp)")
    args = parser.parse_args()
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder")
    root = args.keep or Path(tempfile.mkdtemp(prefix="fanaoi-nightly-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run_benchmark(root, args.data, args.runs, not args.no_push, args.api_url)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
