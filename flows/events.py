"""Events FanAOI sends to the Prefect server, for automations and deployment triggers.

Each event's resource is the project, ``fanaoi.project.<nightly.project>``, so that a
deployment reacts only to its own project's batches when several share one server.
"""

from __future__ import annotations

import logging
from typing import Any

BATCH_INGESTED = "fanaoi.batch.ingested"
REJECT_STREAK = "fanaoi.nightly.reject-streak"
DRAIN_TIMEOUT = 10

log = logging.getLogger(__name__)


def project_resource(project: str) -> dict[str, str]:
    return {"prefect.resource.id": f"fanaoi.project.{project}", "prefect.resource.name": project}


def emit(event: str, project: str, payload: dict[str, Any]) -> bool:
    """Send ``event`` to the configured Prefect server and wait until it is handed over.

    Without a server nothing is sent: Prefect would start a temporary local API only to
    drop the event with it. Returns whether the event was sent.
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        log.debug("no Prefect server (PREFECT_API_URL): %s not sent", event)
        return False
    sent = emit_event(event=event, resource=project_resource(project), payload=payload)
    # A CLI process may exit right after: hand the event over before it does. Meanwhile
    # Prefect's worker logs "Still processing items" as a warning: the wait we chose, not news.
    logging.getLogger(EventsWorker.__name__).setLevel(logging.ERROR)
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT)
    return sent is not None


def emit_batch_ingested(project: str, result: dict[str, Any]) -> bool:
    """A batch added images to the data set: the nightly deployment's trigger listens for this."""
    if not result["accepted"] or not result.get("snapshot"):
        return False
    return emit(BATCH_INGESTED, project, {
        "snapshot": result["snapshot"]["md5"],
        "batch": result["batch"],
        "accepted": result["accepted"],
        "rejected": result["rejected"],
        "counts": result["counts"],
    })


def emit_reject_streak(project: str, streak: int, champion: str | None, reasons: list[str]) -> bool:
    """The gate has rejected ``streak`` nights in a row: an alert automation listens for this."""
    return emit(REJECT_STREAK, project, {"consecutive_rejects": streak, "champion": champion, "reasons": reasons})
