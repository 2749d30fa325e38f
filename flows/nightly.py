"""The nightly retraining flow: validate -> snapshot -> train -> evaluate -> gate -> publish.

Each step is a Prefect task over the same ``tasks/`` function that the dvc.yaml stage
command runs. Before a stage runs, DVC says whether its deps, params and outs changed
since ``dvc.lock`` recorded them: an unchanged stage is skipped (task state "Skipped"),
and a stage that ran is recorded in ``dvc.lock``, so the flow and ``dvc repro`` share one
record and neither redoes the other's work. A night with nothing new finishes in seconds.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, State
from prefect.tasks import exponential_backoff

from flows.names import (
    DECISION_STATES,
    DEFECT_TYPES_KEY,
    METRICS_KEY,
    NIGHTLY_FLOW,
    REPORT_KEY,
    report_description,
)
from flows.params import load_params, project_params_file
from flows.stages import RunInProgress, exclusive_run, pipeline_changes, record_stage, stage_changes
from tasks.durable import details_path
from tasks.errors import FanaoiError
from tasks.nightly_report import defect_type_rows, failure_markdown, metric_rows, report_markdown, validation_lines
from tasks.params import NightlyParams, Params
from tasks.project_lock import project_lock

RUN_LOCK = ".fanaoi/nightly.lock"
SKIPPED = "Skipped"
PIPELINE_STAGES = ("validate", "train", "evaluate", "gate")  # as in dvc.yaml

# Plain OS errors that do not heal by waiting: a missing file, a permission. Others (a
# full disk, a dropped network share, a timeout) may pass on the next attempt.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying.

    A FanaoiError says so itself (``transient``: an unreachable DVC remote, a busy lock);
    validation failures and the other expected errors are not. Nothing here reads the
    message text.
    """
    from dvc.lock import LockError

    if isinstance(exc, LockError):
        return True
    if isinstance(exc, FanaoiError):
        return exc.transient
    return isinstance(exc, OSError) and not isinstance(exc, PERMANENT_OS_ERRORS)


def retry_on_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry only what :func:`is_transient` calls transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, classified below
        return is_transient(exc)
    return False


def retry_options(nightly: NightlyParams) -> dict[str, Any]:
    return {
        "retries": nightly.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=nightly.retry_delay_seconds)
        if nightly.retry_delay_seconds
        else 0,
        "retry_condition_fn": retry_on_transient,
    }


def _skip_if_current(stage: str, known: dict[str, list[str]] | None = None) -> State | None:
    """A "Skipped" state carrying the stage's last report when DVC says nothing changed.

    ``known``: the changes of every stage asked at the start of the run, valid while no
    stage has run since (see ``_run_pipeline``); otherwise DVC is asked now.
    """
    logger = get_run_logger()
    changes = known[stage] if known is not None else stage_changes(Path.cwd(), stage)
    if changes:
        logger.info("%s runs: %s", stage, " | ".join(changes))
        return None
    logger.info("%s skipped: deps, params and outs unchanged since dvc.lock", stage)
    return Completed(name=SKIPPED, message="inputs unchanged since dvc.lock", data=None)


@task(name="pipeline-status", cache_policy=NO_CACHE)
def pipeline_status(stamp_dir: str) -> dict[str, list[str]]:
    """What changed for each stage since dvc.lock, asked of DVC once for the whole pipeline
    (not at all while the stamp in ``stamp_dir`` proves nothing changed)."""
    return pipeline_changes(Path.cwd(), PIPELINE_STAGES, stamp_dir)


@task(name="snapshot", cache_policy=NO_CACHE)
def snapshot_stage(data_dir: str, push: bool, stamp_dir: str) -> dict[str, Any]:
    """``dvc add`` data/ and ``dvc push`` it: the snapshot id every model card cites."""
    from tasks.data.snapshot import snapshot_data

    result = snapshot_data(Path.cwd(), data_dir, push=push, stamp_dir=stamp_dir)
    get_run_logger().info(
        "data snapshot %s (%s%s%s)", result["md5"], "new" if result["changed"] else "unchanged",
        ", pushed" if result["pushed"] else "",
        "; no file changed since it was taken, dvc add skipped" if result["skipped"] else "",
    )
    return result


def _recorded(stage: str, known: dict[str, list[str]] | None, run: Callable[[], Any]) -> Any:
    """Unless DVC reports ``stage`` current, ``run()`` it and record it in dvc.lock.

    Each stage imports its module inside ``run``: a skipped stage loads no TensorFlow or GX.
    """
    if skipped := _skip_if_current(stage, known):
        return skipped
    result = run()
    record_stage(Path.cwd(), stage)
    return result


@task(name="validate", cache_policy=NO_CACHE)
def validate_stage(params: Params, known: dict[str, list[str]] | None = None) -> dict[str, Any] | State:
    """Great Expectations on the manifest of data/; a blocking failure fails the run."""

    def run() -> dict[str, Any]:
        from tasks.data.validate import run_validate

        result = run_validate(params, report=get_run_logger().info)
        return {"valid": result["valid"], "summary": result["summary"]}

    return _recorded("validate", known, run)


@task(name="train", cache_policy=NO_CACHE)
def train_stage(params: Params, known: dict[str, list[str]] | None = None) -> dict[str, Any] | State:
    """Fit the candidate; every epoch is logged to this task run."""

    def run() -> dict[str, Any]:
        from tasks.model.train import run_train
        from tasks.registry.warm_start import champion_warm_start

        summary = run_train(params, report=get_run_logger().info, warm_start=champion_warm_start(params))
        return {key: summary[key] for key in ("kept_epoch", "kept_epoch_metrics", "seconds")}

    return _recorded("train", known, run)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(params: Params, known: dict[str, list[str]] | None = None) -> dict[str, Any] | State:
    """Score the candidate once; choose its threshold; compare evaluate() with the kept epoch."""

    def run() -> dict[str, Any]:
        from tasks.model.evaluate import run_evaluate

        return run_evaluate(params, report=get_run_logger().info)

    return _recorded("evaluate", known, run)


@task(name="gate", cache_policy=NO_CACHE)
def gate_stage(params: Params, known: dict[str, list[str]] | None = None) -> dict[str, Any] | State:
    """Candidate vs champion on the same validation split: promote or reject, with reasons.

    Not recorded here: ``publish_stage`` records it once the decision is carried out.
    """
    if skipped := _skip_if_current("gate", known):
        return skipped
    from tasks.registry.gate import run_gate

    return run_gate(params, report=get_run_logger().info)


@task(name="publish", cache_policy=NO_CACHE)
def publish_stage(params: Params, gate: dict[str, Any]) -> dict[str, Any] | None:
    """Publish a promoted candidate under the registry lock, then record the gate stage.

    The gate stage is recorded only after publishing, so a publish that failed is redone
    by the next run (or ``dvc repro``) instead of being skipped as up to date.
    """
    from tasks.registry.publish import publish

    card = None
    if gate["decision"] == "promote":
        card = publish(params.paths.candidate, gate, params, repo_dir=".", report=get_run_logger().info)
    record_stage(Path.cwd(), "gate")
    return card


@task(name="explain", cache_policy=NO_CACHE)
def explain_stage(params: Params, version: str) -> str | None:
    """The new champion's explain page, drawn now so that the links to it (the nightly report,
    the line's home page) always open; a page that cannot be drawn never fails the night."""
    from tasks.registry.explain_source import explain_model

    try:
        return explain_model(params, version=version, report=get_run_logger().debug)["index"]
    except FanaoiError as exc:
        get_run_logger().warning("the explain page of %s was not drawn: %s", version, exc)
        return None


def _read_report(params: Params, name: str) -> dict[str, Any] | None:
    path = details_path(Path(params.paths.reports) / name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@flow(name=NIGHTLY_FLOW)
def nightly_retrain(params_path: str = "params.yaml", push: bool = True) -> State:
    """Retrain when data, params or code changed; publish only a candidate that beats the champion.

    ``params_path`` names the project: its folder holds dvc.yaml, data/ and the registry.
    The run ends in a Completed-type state named after the decision (:data:`DECISION_STATES`)
    whose result is the run's summary. A run started while another holds the project's run
    lock ends Cancelled at once.
    """
    params_file = project_params_file(params_path)
    params = load_params(params_file)
    project = params_file.parent
    limit = params.nightly.timeout_seconds
    try:
        # A second nightly run is refused at once; an ingest or a stage command running
        # now is waited for (the project lock), so the run sees one consistent data set.
        with (
            run_timeout(limit),
            exclusive_run(project / RUN_LOCK, "nightly_retrain run"),
            project_lock(project, "nightly_retrain run", params.lock.timeout),
            contextlib.chdir(project),
        ):
            _crash_dead_runs(params_file)
            summary = _run_pipeline(params, push, None if limit is None else time.monotonic() + limit)
    except RunInProgress as exc:
        get_run_logger().warning(str(exc))
        return Cancelled(message=str(exc))
    except NightlyTimeout:
        message = (
            f"the run took longer than nightly.timeout_seconds = {limit:g} s and was stopped; "
            f"the champion is unchanged. Its task states show the stage that was running"
        )
        report_failure(message, {}, [])
        raise NightlyTimeout(message) from None
    return Completed(
        name=DECISION_STATES[summary["decision"]], data=summary,
        message=f"decision {summary['decision']}; champion {summary['champion_version'] or 'none yet'}",
    )


def _crash_dead_runs(params_file: Path) -> None:
    """Earlier runs of this project left Running by a killed process end Crashed (flows/dead_runs.py)."""
    from prefect.runtime import flow_run

    from flows.dead_runs import mark_dead_runs_crashed

    try:
        mark_dead_runs_crashed(params_file, flow_run.id)
    except Exception as exc:  # noqa: BLE001 - bookkeeping of dead runs must never fail tonight's run
        get_run_logger().warning("could not check for runs left Running by a killed process: %s", exc)


class NightlyTimeout(TimeoutError):
    """The run passed ``nightly.timeout_seconds``: Prefect ends it in the state TimedOut."""


def run_timeout(seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """Stop the run after ``seconds``, by every route (CLI, ``fanaoi serve``, a worker).

    The limit lives in params.yaml, which the flow reads only once it runs, so it cannot
    be the decorator's ``timeout_seconds``. Prefect's own timeout scope raises
    :class:`NightlyTimeout` here, and the flow engine turns any TimeoutError leaving the
    flow into the state TimedOut, exactly as for a decorator timeout. That interruption
    can land in code that swallows it (it arrives as a signal): :func:`check_deadline`
    between the stages is the backstop.
    """
    from prefect.utilities.timeout import timeout

    return timeout(seconds, timeout_exc_type=NightlyTimeout)


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise NightlyTimeout("nightly.timeout_seconds passed")


def _run_pipeline(params: Params, push: bool, deadline: float | None) -> dict[str, Any]:
    logger = get_run_logger()
    retrying = retry_options(params.nightly)
    stages: dict[str, bool] = {}

    known: dict[str, list[str]] = {}

    def run(stage: Any, stage_params: Params) -> Any:
        check_deadline(deadline)
        # Once a stage ran, its outputs are the next stage's deps: ask DVC again.
        state = stage.with_options(**retrying)(
            stage_params, None if any(stages.values()) else known, return_state=True,
        )
        result = state.result()  # raises the task's own exception when it failed
        stages[stage.name] = state.name != SKIPPED
        return result

    try:
        known = pipeline_status.with_options(**retrying)(params.validate.cache_dir)
        run(validate_stage, params)
        snapshot = snapshot_stage.with_options(**retrying)(
            params.data.dir, push, params.validate.cache_dir,
        )
        run(train_stage, params)
        evaluation = run(evaluate_stage, params)
        gate = run(gate_stage, params)
        check_deadline(deadline)
        card = publish_stage.with_options(**retrying)(params, gate) if stages["gate"] else None
    except FanaoiError as exc:
        report_failure(str(exc), stages, validation_lines(params.paths.reports, reports_base_url(params)))
        raise
    if card:
        explain_stage(params, card["version"])
    summary = summarize(params, stages, snapshot, card, gate=gate, evaluation=evaluation)
    if summary["decision"] == "reject":
        alert_on_reject_streak(params, summary)
    if not any(stages.values()):
        logger.info(
            "nothing changed since the last run (data snapshot %s, params and code unchanged): "
            "no stage ran; champion stays %s", snapshot["md5"], summary["champion_version"],
        )
    report_run(summary)
    return summary


def alert_on_reject_streak(params: Params, summary: dict[str, Any]) -> None:
    """Emit the reject-streak event once the gate has rejected ``alerts.reject_streak`` nights running."""
    from flows.events import emit_reject_streak
    from tasks.registry.decisions import read_log, reject_streak

    wanted = params.alerts.reject_streak
    streak = reject_streak(read_log(params.registry.dir))
    if wanted and streak >= wanted:
        get_run_logger().warning("the gate has rejected %d nights in a row (alerts.reject_streak = %d)",
                                 streak, wanted)
        emit_reject_streak(params.nightly.project, streak, summary["champion_version"],
                           summary["failed"] or summary["reasons"])


def summarize(
    params: Params, stages: dict[str, bool], snapshot: dict[str, Any], card: dict[str, Any] | None, *,
    gate: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the run decided and where the models are: from what the stages returned, or, for a
    stage skipped as current, from the report it wrote when it last ran."""
    from tasks.registry.champion import read_champion
    from tasks.registry.store import CHAMPION_MODEL

    gate = gate or _read_report(params, "gate.json") or {}
    evaluation = evaluation or _read_report(params, "evaluation.json") or {}
    champion = read_champion(params.registry.dir)
    champion_card = (champion.card if champion else None) or {}
    registry = Path(params.registry.dir).resolve()
    return {
        "decision": gate.get("decision") if stages["gate"] else "unchanged",
        "last_decision": gate.get("decision"),
        "reasons": gate.get("reasons", []),
        "failed": gate.get("failed", []),
        "threshold": gate.get("threshold"),
        "threshold_source": gate.get("threshold_source"),
        "saturated": gate.get("saturated", False),
        "deciding_metric": gate.get("deciding_metric"),
        "champion_threshold": champion_card.get("threshold"),
        "champion_threshold_source": champion_card.get("threshold_source"),
        "stages": {name: "ran" if ran else "skipped" for name, ran in stages.items()},
        "data_snapshot": snapshot["md5"],
        "data_changed": snapshot["changed"],
        "published_version": card["version"] if card else None,
        "champion_version": champion.version if champion else None,
        "champion_path": str(registry / CHAMPION_MODEL) if champion else None,
        "candidate_path": str(Path(params.paths.candidate).resolve()),
        "reports_path": str(Path(params.paths.reports).resolve()),
        "reports_dir": params.paths.reports,
        "reports_url": reports_base_url(params),
        "validation": evaluation.get("validation", {}),
        "metrics": metric_rows(gate),
        "defect_types": defect_type_rows(gate),
        "kept_epoch_vs_evaluate": evaluation.get("kept_epoch_vs_evaluate", {}),
    }


def reports_base_url(params: Params) -> str:
    """Where browsers on other machines open ``reports/``: as `fanaoi serve-model` serves it."""
    return f"{params.serve.base_url()}/reports"


@task(name="report", cache_policy=NO_CACHE)
def report_run(summary: dict[str, Any]) -> None:
    """Markdown and table artifacts under stable keys: the dashboard keeps their history."""
    create_markdown_artifact(
        report_markdown(summary), key=REPORT_KEY,
        description=report_description(summary["decision"]),
    )
    if summary["metrics"]:
        create_table_artifact(
            summary["metrics"], key=METRICS_KEY,
            description="candidate vs champion on the gate's validation images",
        )
    if summary.get("defect_types"):
        create_table_artifact(
            summary["defect_types"], key=DEFECT_TYPES_KEY,
            description="escapes per defect type (NG subfolder) on the gate's validation images",
        )


def report_failure(message: str, stages: dict[str, bool], links: list[str]) -> None:
    """A failed night gets a report too: the operator reads why at 7 am."""
    create_markdown_artifact(
        failure_markdown(message, stages, links), key=REPORT_KEY, description=report_description("failed")
    )


