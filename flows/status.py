"""The nightly runs as the Prefect server sees them, for ``fanaoi status``.

Plain HTTP against the REST API under one deadline for the whole exchange: importing
Prefect's client costs more than the two seconds the command may take, and an operator
asking "is it alive?" must not wait for a server that is down, answers slowly byte by
byte, or answers something else than Prefect's JSON (each is one line of the screen).
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Required

import httpx
from pydantic import with_config
from typing_extensions import TypedDict

from flows.names import NIGHTLY_FLOW, REPORT_KEY, decision_of
from tasks.errors import FanaoiError, printable
from tasks.shapes import STRICT, checked

FINAL_STATES = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]


class BadAnswer(FanaoiError):
    """The server at PREFECT_API_URL answered, but not as Prefect's API does."""


@with_config(STRICT)
class RunState(TypedDict, total=False):
    message: str | None


@with_config(STRICT)
class FlowRun(TypedDict, total=False):
    """A flow run as /flow_runs/filter lists it, the keys ``status`` shows."""

    id: Required[str]
    name: str | None
    deployment_id: str | None
    state_type: str | None
    state_name: str | None
    state: RunState | None
    start_time: str | None
    expected_start_time: str | None
    end_time: str | None


@with_config(STRICT)
class Artifact(TypedDict, total=False):
    description: str | None


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile."""
    return _configured("PREFECT_API_URL")


def ui_url(api_url: str) -> str:
    """The dashboard's address: PREFECT_UI_URL, else the API's without ``/api``, as Prefect
    itself infers it for a server of its own (not Prefect Cloud)."""
    return (_configured("PREFECT_UI_URL") or api_url.rstrip("/").removesuffix("/api")).rstrip("/")


def _configured(setting: str) -> str | None:
    """``setting`` from the environment, else from the active Prefect profile."""
    if url := os.environ.get(setting):
        return url
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    profiles_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    try:
        profiles = tomllib.loads(profiles_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    return profiles.get("profiles", {}).get(active, {}).get(setting)


def nightly_runs(api_url: str | None, timeout: float, now: datetime) -> dict[str, Any]:
    """The last finished nightly run and the next scheduled one, or why they are unknown.

    ``timeout`` (status.api_timeout) bounds the whole exchange, not each read.
    """
    if not api_url:
        return {"server": None, "error": "no Prefect server (PREFECT_API_URL is not set)"}
    shown = printable(api_url)
    try:
        last, upcoming, decision = asyncio.run(asyncio.wait_for(_ask(api_url, timeout), timeout))
    except TimeoutError:
        error = (f"the Prefect server at {shown} did not answer within status.api_timeout = "
                 f"{timeout:g} s (params.yaml); check that it is up and not overloaded")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        error = f"no Prefect server at {shown} ({type(exc).__name__}: {printable(str(exc))})"
    except BadAnswer as exc:
        error = (f"the server at {shown} is not a Prefect API ({exc}); "
                 f"check PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    else:
        error = None
    if error:
        return {"server": api_url, "error": error}
    dashboard = ui_url(api_url)
    return {
        "server": api_url,
        "error": None,
        "last_run": _describe(last, decision, now, dashboard) if last else None,
        "next_run": _describe(upcoming, None, now, dashboard) if upcoming else None,
    }


async def _ask(
    api_url: str, timeout: float
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The last finished run, the next scheduled one, and the last one's decision."""
    async with httpx.AsyncClient(base_url=api_url.rstrip("/"), timeout=timeout) as client:
        (await client.get("/health")).raise_for_status()
        last = await _first_run(client, FINAL_STATES, "START_TIME_DESC")
        upcoming = await _first_run(client, ["SCHEDULED"], "EXPECTED_START_TIME_ASC")
        return last, upcoming, await _decision(client, last["id"]) if last else None


async def _first_run(client: httpx.AsyncClient, states: list[str], sort: str) -> dict[str, Any] | None:
    runs = await _listed(client, "/flow_runs/filter", FlowRun, {
        "flows": {"name": {"any_": [NIGHTLY_FLOW]}},
        "flow_runs": {"state": {"type": {"any_": states}}},
        "sort": sort,
        "limit": 1,
    })
    return runs[0] if runs else None


async def _decision(client: httpx.AsyncClient, flow_run_id: str) -> str | None:
    """What the run decided, from its report artifact (a run that never reported has none)."""
    artifacts = await _listed(client, "/artifacts/filter", Artifact, {
        "artifacts": {"key": {"any_": [REPORT_KEY]}, "flow_run_id": {"any_": [flow_run_id]}},
        "limit": 1,
    })
    return decision_of(artifacts[0].get("description")) if artifacts else None


async def _listed(client: httpx.AsyncClient, path: str, item: type, query: dict[str, Any]) -> list[Any]:
    """The list of ``item`` that ``path`` answers to ``query``; BadAnswer for anything else."""
    response = await client.post(path, json=query)
    response.raise_for_status()
    try:
        found = response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise BadAnswer(f"{path} answered {printable(kind)}, not JSON") from None
    return checked(list[item], found, f"{path} answered", "Prefect answers a list of objects", BadAnswer)


def _describe(run: dict[str, Any], decision: str | None, now: datetime, dashboard: str) -> dict[str, Any]:
    start = run.get("start_time") or run.get("expected_start_time")
    end = run.get("end_time")
    duration = _seconds_between(start, end) if end else None
    return {
        "id": run["id"],
        "name": run.get("name"),
        "deployment_id": run.get("deployment_id"),
        "state": run.get("state_type"),
        "state_name": run.get("state_name"),
        "message": (run.get("state") or {}).get("message"),
        "start": start,
        "end": end,
        "duration_seconds": duration,
        "starts_in_seconds": _seconds_between(now.isoformat(), start) if not end else None,
        "decision": decision,
        "url": f"{dashboard}/runs/flow-run/{run['id']}",
    }


def _seconds_between(first: str | None, second: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(second) - datetime.fromisoformat(first)).total_seconds()
    except (TypeError, ValueError):
        return None
