"""A nightly run whose process died ends Crashed when the next run of its project starts."""

from __future__ import annotations

import pytest


@pytest.mark.integration
def test_runs_left_running_by_a_dead_process_end_crashed_and_other_projects_are_left_alone(prefect_server, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from flows.dead_runs import mark_dead_runs_crashed
    from flows.nightly import nightly_retrain

    ours, theirs = tmp_path / "line-1" / "params.yaml", tmp_path / "line-2" / "params.yaml"
    prefect_server.wait_until_healthy()
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as client:
        def started(params_file):
            return client.create_flow_run(nightly_retrain, parameters={"params_path": str(params_file)},
                                          state=Running())

        killed, other_project, tonight = started(ours), started(theirs), started(ours)
        assert mark_dead_runs_crashed(ours, str(tonight.id)) == [killed.name]
        states = {run.id: client.read_flow_run(run.id).state for run in (killed, other_project, tonight)}
        assert states[killed.id].type.value == "CRASHED"
        assert "process died" in states[killed.id].message
        assert states[other_project.id].type.value == states[tonight.id].type.value == "RUNNING"
        assert mark_dead_runs_crashed(ours, str(tonight.id)) == []  # a crashed run stays as it is
