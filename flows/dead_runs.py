"""Nightly runs whose process died (``kill -9``, a machine that lost power) end Crashed.

Prefect marks a run Crashed when its process can still say so; a killed process says
nothing, and its run stays Running on the server forever: the dashboard shows a night
that never ends and the next run's concurrency slot may look taken. Each nightly run
holds the project's run lock (flows/stages.py ``exclusive_run``), an OS lock the kernel
drops when its holder dies; so once a run holds it, any other run of the same project
still Running or Pending on the server has lost its process, and this run says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.names import NIGHTLY_FLOW

log = logging.getLogger(__name__)

UNFINISHED = ("RUNNING", "PENDING", "CANCELLING")


def mark_dead_runs_crashed(params_file: Path, current_run: str | None) -> list[str]:
    """Set every other unfinished nightly run of ``params_file`` Crashed; returns their names.

    Call it only while holding the project's run lock. Runs of other projects on the same
    server (another params file) are left alone: they have locks of their own.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType(name) for name in UNFINISHED])))
    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[NIGHTLY_FLOW])),
                                     flow_run_filter=unfinished)
        for run in runs:
            theirs = Path(str(run.parameters.get("params_path", "params.yaml"))).resolve()
            if str(run.id) == current_run or theirs != params_file.resolve():
                continue
            client.set_flow_run_state(run.id, Crashed(
                message="its process died without a word (killed or the machine stopped); found by the "
                        "next run of the project, which holds its run lock"), force=True)
            marked.append(run.name)
    for name in marked:
        log.warning("nightly run %s was still Running on the server but its process is gone: marked Crashed", name)
    return marked
