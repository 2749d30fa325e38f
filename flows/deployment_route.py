"""The nightly deployment (cron, the ingest trigger, one run at a time), and one route for it:
`fanaoi serve` takes over a deployment `prefect deploy` bound to a work pool.

A served deployment keeps the work pool, pull steps and storage of the one it updates, so
after `prefect deploy --all` every run `fanaoi serve` starts crashes looking for flow code
in storage at None. Serving replaces such a deployment instead: the old one is deleted
with the automations of its triggers (the server deletes a deployment but not those), and
`serve` creates it again, with its own trigger, for this process to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.exceptions import ObjectNotFound

from flows.names import DEPLOYMENT_NAME
from flows.nightly import nightly_retrain
from tasks.params import NightlyParams, Params


def replace_pool_deployment(full_name: str) -> str | None:
    """Delete the deployment ``flow/name`` and its triggers' automations when a work pool runs it.

    Returns that work pool's name; None when there is no such deployment or no pool runs it
    (a deployment `fanaoi serve` made before: `serve` updates it in place).
    """
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            return None
        if not deployment.work_pool_name:
            return None
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
        client.delete_deployment(deployment.id)
        return deployment.work_pool_name


def local_timezone() -> str:
    """This machine's IANA time zone name, so "02:00" means 02:00 on the line's clock."""
    import tzlocal

    return tzlocal.get_localzone_name()


def ingest_triggers(nightly: NightlyParams) -> list[Any]:
    """Run once batches stop arriving: ``nightly.ingest_quiet_seconds`` after the last one.

    A proactive trigger whose ``after`` and ``expect`` are the same event is Prefect's
    debounce: each batch restarts the window, and the run starts when a window passes
    with no batch, so five batches in a row start one run, after the last. ``for_each``
    matters: without it the server keeps an open window even with no batch, and a quiet
    trigger would start a run every window.
    """
    from datetime import timedelta

    from prefect.events import DeploymentEventTrigger
    from prefect.events.schemas.automations import Posture

    from flows.events import BATCH_INGESTED, project_resource

    if nightly.ingest_quiet_seconds is None:
        return []
    return [DeploymentEventTrigger(
        name=f"{nightly.project}: batches ingested, then quiet",
        after={BATCH_INGESTED}, expect={BATCH_INGESTED},
        match={"prefect.resource.id": project_resource(nightly.project)["prefect.resource.id"]},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive, threshold=1, within=timedelta(seconds=nightly.ingest_quiet_seconds),
    )]


def nightly_deployment(params: Params, params_file: Path) -> Any:
    """The nightly_retrain deployment: cron from params, a run after ingests, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    nightly = params.nightly
    return nightly_retrain.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(nightly.cron, timezone=nightly.timezone or local_timezone())],
        triggers=ingest_triggers(nightly),
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=nightly.collision_strategy
        ),
        parameters={"params_path": str(params_file.resolve())},
        description="Nightly retraining of the GO/NG fan classifier (params.yaml: nightly)",
        tags=["fanaoi"],
    )
