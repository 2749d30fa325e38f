"""The nightly flow under a temporary Prefect API, on a tiny git + DVC project."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import pytest
import yaml
from prefect.client.schemas.objects import ConcurrencyLimitStrategy

from flows.deployment_route import ingest_triggers, nightly_deployment
from flows.nightly import (
    DEFECT_TYPES_KEY,
    METRICS_KEY,
    REPORT_KEY,
    SKIPPED,
    is_transient,
    nightly_retrain,
)
from flows.params import load_params
from flows.stages import pipeline_changes, stage_changes
from tasks.data.snapshot import SnapshotError, data_snapshot_id
from tasks.data.validate import ValidationFailed
from tasks.errors import FanaoiError
from tasks.nightly_report import defect_type_rows, metric_rows, report_markdown
from tasks.registry.champion import read_champion
from tasks.registry.decisions import read_log
from tasks.registry.store import RegistryLockedError, list_versions
from tests.dvc_support import run
from tests.flows.conftest import update_params

PIPELINE_STAGES = ("validate", "train", "evaluate", "gate")
SETTLE_TIMEOUT = 30
T = TypeVar("T")


def flow_run_id(state: Any) -> UUID:
    return state.state_details.flow_run_id


def settled(read: Callable[[], T], ready: Callable[[T], bool]) -> T:
    """``read()`` once ``ready`` says so, or at the timeout (the caller's asserts then fail).

    Task run states and logs reach the API as events, recorded a moment after the flow
    returns.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def task_runs(state: Any, expected: Iterable[str] = ()) -> dict[str, Any]:
    """Task runs of a flow run by task name (validate, snapshot, ...), ``expected`` ones final."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def read() -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
            )
        return {task_run.name.rsplit("-", 1)[0]: task_run for task_run in runs}

    names = tuple(expected)
    # A task run can be listed a moment before its first state arrives (state None).
    return settled(read, lambda runs: all(n in runs and runs[n].state is not None and runs[n].state.is_final()
                                          for n in names))


def artifacts(state: Any) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id(state)]))
        )
    return {artifact.key: artifact for artifact in found}


def log_messages(state: Any, awaited_prefix: str) -> list[str]:
    """The flow run's log messages, once one starting with ``awaited_prefix`` has arrived."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def read() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id(state)]))
            )
        return [entry.message for entry in logs]

    return settled(read, lambda messages: any(m.startswith(awaited_prefix) for m in messages))


def runs_list_state(state: Any) -> tuple[str, str]:
    """The flow run's state type and name as the server lists it (the dashboard's runs list)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (listed,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])))
    return listed.state_type.value, listed.state_name


def copy_project(project: Path, target: Path) -> Path:
    """A private copy (git, DVC cache, dvc.lock, registry) for a test that changes things."""
    shutil.copytree(project, target, symlinks=True)
    return target


def test_first_run_trains_gates_and_publishes(nightly_project: dict[str, Any]) -> None:
    project, state = nightly_project["project"], nightly_project["state"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["decision"] == "promote"
    assert runs_list_state(state) == ("COMPLETED", "Promoted")
    assert summary["stages"] == dict.fromkeys(PIPELINE_STAGES, "ran")
    assert summary["published_version"] == "v0001"
    assert summary["champion_path"] == str(project / "registry" / "champion.h5")
    evaluation = json.loads((project / "reports" / "evaluation-details.json").read_text())
    assert summary["validation"] == evaluation["validation"]

    every_task = ("validate", "snapshot", "train", "evaluate", "gate", "publish", "explain", "report")
    runs = task_runs(state, every_task)
    for name in every_task:
        assert runs[name].state.name == "Completed", name
    champion = read_champion(project / "registry")
    assert champion.version == "v0001" and champion.problem is None
    assert champion.card["data_snapshot"] == data_snapshot_id(project)
    # The flow recorded every stage in dvc.lock: DVC sees nothing left to do.
    assert all(stage_changes(project, stage) == [] for stage in PIPELINE_STAGES)
    assert pipeline_changes(project, PIPELINE_STAGES) == dict.fromkeys(PIPELINE_STAGES, [])

    epochs = [m for m in log_messages(state, "epoch 1/") if m.startswith("epoch 1/")]
    assert epochs, "per-epoch progress must reach the Prefect logger"


def test_first_run_publishes_report_and_metrics_artifacts(nightly_project: dict[str, Any]) -> None:
    project, state = nightly_project["project"], nightly_project["state"]
    found = artifacts(state)
    report = found[REPORT_KEY]
    assert report.type == "markdown"
    assert "# Nightly retrain: PROMOTE" in report.data
    assert data_snapshot_id(project) in report.data
    assert "| validation accuracy |" in report.data  # the evaluate-vs-last-epoch table
    # The new champion's explain page is drawn by the run itself: the report's link opens.
    assert (project / "reports" / "explain" / "v0001" / "index.html").is_file()
    assert "explain/v0001/" in report.data
    table = found[METRICS_KEY]
    assert table.type == "table"
    rows = {row["metric"]: row for row in json.loads(table.data)}
    gate = json.loads((project / "reports" / "gate-details.json").read_text())
    assert rows["accuracy"]["candidate"] == round(gate["candidate"]["metrics"]["accuracy"], 4)
    assert rows["accuracy"]["champion"] is None  # first run: no champion to compare with
    # No NG subfolders in this data set: one defect type, "untyped", with its upper bound.
    per_type = json.loads(found[DEFECT_TYPES_KEY].data)
    untyped = gate["candidate"]["metrics"]["defect_types"]["untyped"]
    assert [(row["defect_type"], row["images"], row["escape_rate_upper95"]) for row in per_type] == [
        ("untyped", untyped["count"], round(untyped["escape_rate_upper95"], 4))]
    assert "| untyped |" in report.data


def test_second_run_with_nothing_changed_skips_every_stage(nightly_project: dict[str, Any]) -> None:
    project = nightly_project["project"]
    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["decision"] == "unchanged"
    assert runs_list_state(state) == ("COMPLETED", "Unchanged")
    assert summary["last_decision"] == "promote"
    assert summary["stages"] == dict.fromkeys(PIPELINE_STAGES, "skipped")
    runs = task_runs(state, (*PIPELINE_STAGES, "snapshot", "report"))
    assert {runs[name].state.name for name in PIPELINE_STAGES} == {SKIPPED}
    assert "publish" not in runs
    assert list_versions(project / "registry") == ["v0001"]
    nothing = "nothing changed since the last run"
    assert any(m.startswith(nothing) for m in log_messages(state, nothing))
    assert "# Nightly retrain: UNCHANGED" in artifacts(state)[REPORT_KEY].data
    # dvc repro reads the same record: nothing to do for it either.
    assert "up to date" in run(project, "dvc", "status").stdout


def test_two_runs_at_once_publish_once(nightly_project: dict[str, Any], tmp_path: Path) -> None:
    project = copy_project(nightly_project["project"], tmp_path / "project")
    # A gate rule change: the gate stage reruns (no training) and promotes the same model (a tie
    # passes at min_delta 0).
    update_params(project, {"gate": {"min_delta": 0.0}})
    changes = pipeline_changes(project, PIPELINE_STAGES)
    assert [stage for stage, found in changes.items() if found] == ["gate"]
    assert "params.yaml" in changes["gate"][0] and changes["gate"] == stage_changes(project, "gate")
    params_path = str(project / "params.yaml")
    states: list[Any] = []
    start = threading.Barrier(2)

    def start_run() -> None:
        start.wait()
        states.append(nightly_retrain(params_path=params_path, return_state=True))

    threads = [threading.Thread(target=start_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    completed = [s for s in states if s.is_completed()]
    cancelled = [s for s in states if s.is_cancelled()]
    assert len(completed) == 1 and len(cancelled) == 1, [s.message for s in states]
    assert "another nightly_retrain run is running" in cancelled[0].message
    summary = completed[0].result()
    assert summary["stages"] == {"validate": "skipped", "train": "skipped",
                                 "evaluate": "skipped", "gate": "ran"}
    assert summary["published_version"] == "v0002"
    assert list_versions(project / "registry") == ["v0001", "v0002"]
    champion = read_champion(project / "registry")
    assert champion.version == "v0002" and champion.problem is None
    assert [e["action"] for e in read_log(project / "registry")] == ["promote", "promote"]


def test_a_rejected_candidate_names_the_run_rejected(nightly_project: dict[str, Any], tmp_path: Path) -> None:
    project = copy_project(nightly_project["project"], tmp_path / "project")
    # Only the gate reruns: the same model against itself as champion gains less than min_delta.
    update_params(project, {"gate": {"min_delta": 0.01}})
    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)

    assert state.result()["decision"] == "reject"
    assert runs_list_state(state) == ("COMPLETED", "Rejected")
    assert list_versions(project / "registry") == ["v0001"]


@pytest.mark.slow
def test_dvc_repro_gives_the_numbers_of_the_flow(nightly_project: dict[str, Any], tmp_path: Path) -> None:
    project = copy_project(nightly_project["project"], tmp_path / "project")
    reports = project / "reports"
    by_flow = {name: (reports / name).read_text() for name in ("history.csv", "evaluation.json")}
    model = project / "models" / "candidate.h5"
    model_by_flow = model.read_bytes()

    run(project, "dvc", "repro", "--force", "evaluate")

    # Byte for byte, although the flow trained inside this long-lived test process.
    assert model.read_bytes() == model_by_flow
    assert (reports / "history.csv").read_text() == by_flow["history.csv"]
    repro, flow = (json.loads(text) for text in
                   ((reports / "evaluation.json").read_text(), by_flow["evaluation.json"]))
    assert repro == flow


def test_validation_failure_fails_the_run_without_retries(
    nightly_project: dict[str, Any], tmp_path: Path
) -> None:
    project = copy_project(nightly_project["project"], tmp_path / "project")
    (project / "data" / "GO" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)

    assert state.is_failed()
    with pytest.raises(ValidationFailed, match="broken.png"):
        state.result()
    runs = task_runs(state, ("validate",))
    assert runs["validate"].state.name == "Failed"
    assert runs["validate"].run_count == 1  # bad data does not heal by retrying
    assert "train" not in runs
    report = artifacts(state)[REPORT_KEY].data
    assert "# Nightly retrain: FAILED" in report and "broken.png" in report
    assert "(http://127.0.0.1:8000/reports/validation.html)" in report
    assert read_champion(project / "registry").version == "v0001"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(28, "No space left on device"), True),
        (TimeoutError("share did not answer"), True),
        (FileNotFoundError(2, "No such file", "data/GO"), False),
        (PermissionError(13, "Permission denied", "registry"), False),
        (ValidationFailed("data/GO/x.png: not an image"), False),
        # The flag decides, whatever the message says.
        (SnapshotError("/p: `dvc push` failed: timeout", transient=True), True),
        (SnapshotError("/p: `dvc push` failed: timeout", transient=False), False),
        (RegistryLockedError("another FanAOI run is publishing"), True),
        (FanaoiError("disk full, connection reset, `dvc push` failed"), False),
    ],
)
def test_only_transient_failures_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def _remote_behind(project: Path, remote: Path) -> None:
    config = project / ".dvc" / "config"
    text = config.read_text(encoding="utf-8")
    config.write_text(re.sub(r"url = .*", f"url = {remote}", text), encoding="utf-8")


def test_an_unreachable_remote_is_retried_and_the_run_succeeds(
    nightly_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.data.snapshot

    project = copy_project(nightly_project["project"], tmp_path / "project")
    blocker = tmp_path / "share"  # a regular file where the remote's parent folder should be
    blocker.write_text("not a folder", encoding="utf-8")
    _remote_behind(project, blocker / "remote")
    failures: list[SnapshotError] = []
    real_run_dvc = tasks.data.snapshot.run_dvc

    def run_dvc_then_heal(repo_dir: Path | str, *args: str) -> str:
        try:
            return real_run_dvc(repo_dir, *args)
        except SnapshotError as exc:  # a real DVC failure; the share comes back afterwards
            failures.append(exc)
            blocker.unlink()
            raise

    monkeypatch.setattr(tasks.data.snapshot, "run_dvc", run_dvc_then_heal)
    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)

    assert state.is_completed(), state.message
    assert [(f.command, f.transient) for f in failures] == [("dvc push data.dvc", True)]
    runs = task_runs(state, ("snapshot",))
    assert runs["snapshot"].state.name == "Completed" and runs["snapshot"].run_count == 2
    assert any(p.is_file() for p in (blocker / "remote").rglob("*"))


def test_a_missing_remote_is_not_retried(
    nightly_project: dict[str, Any], tmp_path: Path
) -> None:
    project = copy_project(nightly_project["project"], tmp_path / "project")
    config = project / ".dvc" / "config"
    config.write_text("[core]\n    analytics = false\n    check_update = false\n", encoding="utf-8")

    state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)

    assert state.is_failed()
    with pytest.raises(SnapshotError, match="no DVC remote; add one") as failure:
        state.result()
    assert failure.value.transient is False
    assert task_runs(state, ("snapshot",))["snapshot"].run_count == 1


def test_report_says_unchanged_and_keeps_the_last_decision() -> None:
    summary = {
        "decision": "unchanged", "last_decision": "reject", "reasons": ["accuracy 0.9 < 0.95"],
        "stages": dict.fromkeys(PIPELINE_STAGES, "skipped"), "data_snapshot": "abc.dir",
        "data_changed": False, "published_version": None, "champion_version": "v0003",
        "champion_path": "/r/champion.h5", "candidate_path": "/m/candidate.h5",
        "metrics": [], "kept_epoch_vs_evaluate": {}, "reports_url": "http://127.0.0.1:8000/reports",
        "reports_dir": "reports",
    }
    text = report_markdown(summary)
    assert "# Nightly retrain: UNCHANGED" in text
    assert "Last decision: **reject**" in text
    assert "`abc.dir`" in text and "champion: v0003" in text
    assert "- accuracy 0.9 < 0.95" in text


def test_report_names_the_metric_that_decided_when_the_primary_one_saturated() -> None:
    summary = {
        "decision": "promote", "last_decision": "promote", "reasons": ["accuracy has saturated: ..."],
        "stages": dict.fromkeys(PIPELINE_STAGES, "ran"), "data_snapshot": "abc.dir", "data_changed": True,
        "published_version": "v0002", "champion_version": "v0002", "champion_path": "/r/champion.h5",
        "candidate_path": "/m/candidate.h5", "metrics": [], "kept_epoch_vs_evaluate": {},
        "reports_url": "http://127.0.0.1:8000/reports", "reports_dir": "reports",
        "saturated": True, "deciding_metric": "log_loss",
    }
    line = "- decided on **log_loss**: the primary metric has saturated (see the reasons)"
    assert line in report_markdown(summary)
    assert line not in report_markdown({**summary, "decision": "unchanged"})  # no gate ran tonight
def test_an_unchanged_report_says_which_stages_ran_and_the_champions_threshold() -> None:
    summary = {
        "decision": "unchanged", "last_decision": "reject", "reasons": ["accuracy +0.0000 >= 0.005: FAIL"],
        "stages": {"validate": "ran", "train": "skipped", "evaluate": "skipped", "gate": "skipped"},
        "threshold": 0.6123, "threshold_source": "calibrated: candidate",
        "champion_threshold": 0.4712, "champion_threshold_source": "calibrated: champion",
        "data_snapshot": "abc.dir", "data_changed": True, "published_version": None,
        "champion_version": "v0003", "champion_path": "/r/champion.h5", "candidate_path": "/m/candidate.h5",
        "metrics": [], "kept_epoch_vs_evaluate": {}, "reports_url": "http://127.0.0.1:8000/reports",
        "reports_dir": "reports",
    }
    text = report_markdown(summary)
    assert "no stage ran" not in text
    assert "(validate ran; train, evaluate, gate as in dvc.lock: no new candidate to gate)" in text
    assert "- stages: validate ran, train skipped, evaluate skipped, gate skipped" in text
    assert "- NG threshold of the champion 0.4712: calibrated: champion" in text
    assert "0.6123" not in text  # the rejected candidate's, from the last gate report

    nothing_ran = report_markdown({**summary, "stages": dict.fromkeys(PIPELINE_STAGES, "skipped")})
    assert "(no stage ran: data, params and code as in dvc.lock)" in nothing_ran
    rejected = report_markdown({**summary, "decision": "reject", "stages": dict.fromkeys(PIPELINE_STAGES, "ran")})
    assert "- NG threshold of the champion 0.4712: calibrated: champion" in rejected
    assert "- NG threshold of the rejected candidate 0.6123: calibrated: candidate" in rejected


def test_report_links_the_validation_page_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the flow writes its report from the project folder
    summary = {
        "decision": "reject", "last_decision": "reject", "reasons": [],
        "stages": dict.fromkeys(PIPELINE_STAGES, "ran"), "data_snapshot": "abc.dir",
        "data_changed": True, "published_version": None, "champion_version": None,
        "champion_path": None, "candidate_path": "/m/candidate.h5",
        "metrics": [], "kept_epoch_vs_evaluate": {}, "reports_url": "http://line-7:8000/reports",
        "reports_dir": "reports",
    }
    assert "validation report" not in report_markdown(summary)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "validation.html").write_text("<html></html>")
    link = "- validation report: [reports/validation.html](http://line-7:8000/reports/validation.html)"
    assert link in report_markdown(summary)


def test_metric_rows_compare_candidate_with_champion() -> None:
    gate = {
        "candidate": {"metrics": {"accuracy": 0.97, "escape_rate": 0.01, "auc": None}},
        "champion": {"metrics": {"accuracy": 0.95, "escape_rate": 0.02, "auc": 0.99}},
    }
    rows = {row["metric"]: row for row in metric_rows(gate)}
    assert rows["accuracy"] == {"metric": "accuracy", "candidate": 0.97, "champion": 0.95,
                                "delta": 0.02}
    assert rows["escape_rate"]["delta"] == -0.01
    assert rows["auc"]["delta"] is None
    assert "f1" not in rows


def test_deployment_takes_cron_and_one_run_at_a_time_from_params(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"nightly": {
        "cron": "30 1 * * 1-5", "timezone": "Asia/Taipei", "collision_strategy": "ENQUEUE",
    }}))
    deployment = nightly_deployment(load_params(params_file), params_file)

    assert deployment.name == "nightly"
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 1 * * 1-5", "Asia/Taipei")
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert deployment.concurrency_limit == 1
    assert deployment.parameters == {"params_path": str(params_file)}
    (trigger,) = deployment.triggers
    assert trigger.expect == trigger.after == {"fanaoi.batch.ingested"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "fanaoi.project.fanaoi"}
    assert (trigger.posture.value, trigger.within.total_seconds()) == ("Proactive", 900)


def test_prefect_yaml_declares_the_schedule_of_params_yaml() -> None:
    root = Path(__file__).resolve().parents[2]
    declared = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"][0]
    nightly = load_params(root / "params.yaml").nightly
    assert declared["entrypoint"] == "flows/nightly.py:nightly_retrain"
    assert declared["schedules"][0]["cron"] == nightly.cron
    assert declared["concurrency_limit"] == {
        "limit": 1, "collision_strategy": nightly.collision_strategy,
    }
    (trigger,) = ingest_triggers(nightly)
    (written,) = declared["triggers"]
    assert set(written["after"]) == trigger.after and set(written["expect"]) == trigger.expect
    assert set(written["for_each"]) == trigger.for_each == {"prefect.resource.id"}
    assert written["match"] == trigger.match.model_dump()
    assert (written["posture"], written["within"]) == (trigger.posture.value, trigger.within.total_seconds())


def test_a_run_waits_for_an_ingest_holding_the_project_lock(
    nightly_project: dict[str, Any], tmp_path: Path
) -> None:
    from tasks.project_lock import ProjectLocked
    from tests.tasks.test_project_lock import hold_lock

    project = copy_project(nightly_project["project"], tmp_path / "project")
    update_params(project, {"lock": {"timeout": 0.5}})
    holder = hold_lock(project, 60)  # an ingest in another process, still copying
    try:
        state = nightly_retrain(params_path=str(project / "params.yaml"), return_state=True)
    finally:
        holder.kill()
        holder.wait()

    assert state.is_failed()
    with pytest.raises(ProjectLocked, match=rf"pid {holder.pid} on .*fanaoi ingest nightly-batch/"):
        state.result()
    assert "validate" not in task_runs(state)  # nothing ran on a data set being changed


def test_dashboard_gives_escapes_per_defect_type_with_upper_bounds() -> None:
    crack = {"count": 12, "escapes": 2, "escape_rate": 2 / 12, "escape_rate_upper95": 0.48414}
    blowhole = {"count": 40, "escapes": 0, "escape_rate": 0.0, "escape_rate_upper95": 0.08809}
    gate = {
        "candidate": {"metrics": {"escape_rate": 0.0385, "escape_rate_upper95": 0.1321,
                                  "defect_types": {"blowhole": blowhole, "crack": crack}}},
        "champion": {"metrics": {"escape_rate": 0.02, "escape_rate_upper95": 0.1,
                                 "defect_types": {"crack": {**crack, "escapes": 1, "escape_rate": 1 / 12}}}},
    }
    rows = defect_type_rows(gate)
    assert rows == [
        {"defect_type": "blowhole", "images": 40, "escapes": 0, "escape_rate": 0.0,
         "escape_rate_upper95": 0.0881, "champion_escape_rate": None},
        {"defect_type": "crack", "images": 12, "escapes": 2, "escape_rate": 0.1667,
         "escape_rate_upper95": 0.4841, "champion_escape_rate": 0.0833},
    ]
    upper = {row["metric"]: row for row in metric_rows(gate)}["escape_rate_upper95"]
    assert (upper["candidate"], upper["champion"]) == (0.1321, 0.1)
    summary = {
        "decision": "reject", "last_decision": "reject", "reasons": [], "stages": {},
        "data_snapshot": "abc.dir", "data_changed": False, "published_version": None,
        "champion_version": None, "champion_path": None, "candidate_path": "/m/candidate.h5",
        "metrics": [], "defect_types": rows, "kept_epoch_vs_evaluate": {},
        "reports_url": "http://127.0.0.1:8000/reports", "reports_dir": "reports",
    }
    text = report_markdown(summary)
    assert "## Escapes per defect type (validation)" in text
    assert "| blowhole | 40 | 0 | 0.0000 | 0.0881 | - |" in text
    assert "| crack | 12 | 2 | 0.1667 | 0.4841 | 0.0833 |" in text
    assert "Escapes per defect type" not in report_markdown({**summary, "defect_types": []})
