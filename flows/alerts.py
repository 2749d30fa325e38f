"""Alerts: Prefect automations that send a notification when a night goes wrong.

Two automations on the Prefect server, both sending through one notification block:

- a nightly-retrain run ends Failed, Crashed or TimedOut (state events the server emits);
- the gate rejected the candidate ``alerts.reject_streak`` nights in a row (the event
  ``fanaoi.nightly.reject-streak``, which the nightly flow emits).

The block is a custom webhook posting JSON to ``alerts.webhook_url`` (or the environment
variable :data:`WEBHOOK_ENV`), or any notification block already saved on the server
(``alerts.block``, e.g. ``slack-webhook/aoi-line`` or ``email-server-credentials/...``).
The server sends the notification, so the machines running flows need no route to the
receiver.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

from flows.events import REJECT_STREAK
from flows.names import NIGHTLY_FLOW
from tasks.errors import FanaoiError
from tasks.params import AlertParams

WEBHOOK_ENV = "FANAOI_ALERT_WEBHOOK_URL"
WEBHOOK_BLOCK = "fanaoi-alerts"
FAILED_AUTOMATION = "fanaoi: nightly run failed"
REJECTS_AUTOMATION = "fanaoi: candidate rejected night after night"
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")

FAILED_SUBJECT = "FanAOI nightly run {{ flow_run.state.name }}: {{ flow_run.name }}"
FAILED_BODY = """\
The nightly retraining run {{ flow_run.name }} ended {{ flow_run.state.name }} at {{ flow_run.state.timestamp }}.
Why: {{ flow_run.state.message }}
The champion is unchanged: a failed run publishes nothing.
Flow run: {% if flow_run|ui_url %}{{ flow_run|ui_url }}{% else %}{{ api_url }}/flow_runs/{{ flow_run.id }} \
(the API's record of the run: set PREFECT_UI_URL where the server runs for its dashboard page){% endif %} \
(id {{ flow_run.id }}); its report artifact nightly-retrain-report says which stage failed. \
`fanaoi status` on the project machine shows the state of the line.
"""
REJECTS_SUBJECT = "FanAOI: candidate rejected {{ event.payload.consecutive_rejects }} nights in a row"
REJECTS_BODY = """\
The gate of project {{ event.resource['prefect.resource.name'] }} rejected the new candidate \
{{ event.payload.consecutive_rejects }} nights in a row; the champion {{ event.payload.champion }} stays.
Last reasons: {{ event.payload.reasons }}
`fanaoi history` lists every decision; the nightly-retrain-report artifact has the numbers.
"""


class AlertSetupError(FanaoiError):
    """Alerts cannot be set up as params say; the message names the setting and the fix."""


def webhook_url(alerts: AlertParams) -> str | None:
    """The receiver, checked: the environment variable wins over params (URLs may carry a secret).

    An unusable URL is refused here, before anything is saved on the server: Prefect would
    store it and the first failed night would go unreported.
    """
    from_env = os.environ.get(WEBHOOK_ENV)
    url, source = (from_env, WEBHOOK_ENV) if from_env else (alerts.webhook_url, "alerts.webhook_url")
    problem = url and _url_problem(url)
    if problem:
        raise AlertSetupError(
            f"{source} {masked_url(url)!r} {problem}; set it to the receiver's http(s) URL, "
            f"e.g. https://chat.example.com/hooks/aoi-line"
        )
    return url


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive a POST from the Prefect server, or None when it can."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: a port that is not a number raises here
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https"):
        return f"is not an http or https URL (scheme {parts.scheme or 'missing'})"
    if not parts.hostname:
        return "names no host"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "holds spaces or control characters"
    return None


def masked_url(url: str) -> str:
    """``url`` safe to print: a password or token in its user info or its query becomes ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable, not shown)"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))


def alerts_configured(alerts: AlertParams) -> bool:
    return bool(alerts.block or webhook_url(alerts))


def alert_target(alerts: AlertParams) -> str:
    """Where the alerts go, safe to print; refuses a missing receiver or an unusable URL."""
    return f"block {alerts.block}" if alerts.block else f"webhook {masked_url(_required_webhook_url(alerts))}"


def _required_webhook_url(alerts: AlertParams) -> str:
    url = webhook_url(alerts)
    if not url:
        raise AlertSetupError(
            f"no alert receiver: set alerts.webhook_url in params.yaml, {WEBHOOK_ENV}, "
            f"or alerts.block to a saved notification block"
        )
    return url


def notification_block_id(alerts: AlertParams) -> UUID:
    """The block the automations send through: ``alerts.block``, or the webhook block saved now."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if alerts.block:
        try:
            block = Block.load(alerts.block)
        except ValueError as exc:
            raise AlertSetupError(
                f"alerts.block {alerts.block!r}: no such block on the Prefect server ({exc}); "
                f"create it in the dashboard (Blocks) or with `prefect block create`"
            ) from None
        return block._block_document_id
    block = CustomWebhookNotificationBlock(
        name="FanAOI", url=_required_webhook_url(alerts), method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
        timeout=10,
    )
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def failed_body(api_url: str) -> str:
    """:data:`FAILED_BODY` with ``api_url`` as the fallback link to the run.

    The server renders the body, and its ``ui_url`` filter gives nothing unless PREFECT_UI_URL
    is set where the server runs (`fanaoi server` sets it; `prefect server start` does not).
    The server does not know its own API URL either: the one the alerts are installed through
    is written into the template, so an alert always says where the run is.
    """
    return "{% set api_url = " + json.dumps(api_url.rstrip("/")) + " %}" + FAILED_BODY


def automations(alerts: AlertParams, block_id: UUID, api_url: str) -> list[Any]:
    """The two automations, for the nightly-retrain flow of any deployment or direct run."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    failed = Automation(
        name=FAILED_AUTOMATION,
        description="A nightly-retrain run ended Failed, Crashed or TimedOut (fanaoi alerts)",
        trigger=EventTrigger(
            expect=set(FAILED_EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": NIGHTLY_FLOW},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=failed_body(api_url))],
    )
    found = [failed]
    if alerts.reject_streak:
        found.append(Automation(
            name=REJECTS_AUTOMATION,
            description=f"The gate rejected {alerts.reject_streak} nights in a row (alerts.reject_streak)",
            trigger=EventTrigger(expect={REJECT_STREAK}, posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(block_document_id=block_id, subject=REJECTS_SUBJECT, body=REJECTS_BODY)],
        ))
    return found


def install_alerts(alerts: AlertParams) -> list[str]:
    """Save the block and (re)create the automations on the server; returns their names.

    Automations of an earlier install are replaced, so running it again after a change
    of params leaves one of each.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    block_id = notification_block_id(alerts)
    wanted = automations(alerts, block_id, get_current_settings().api.url)
    with get_client(sync_client=True) as client:
        for name in (FAILED_AUTOMATION, REJECTS_AUTOMATION):
            for old in client.read_automations_by_name(name):
                client.delete_automation(old.id)
    for automation in wanted:
        automation.create()
    return [automation.name for automation in wanted]
