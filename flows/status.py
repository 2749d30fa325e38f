"""The nightly runs as the Prefect server sees them, for ``fanaoi status``.

Plain HTTP against the REST API with a short timeout: importing Prefect's client costs
more than the two seconds the command may take, and an operator asking "is it alive?"
must not wait for a server that is down.
"""

from __future__ import annotations

import os
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from flows.names import NIGHTLY_FLOW, REPORT_KEY, decision_of

FINAL_STATES = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    profiles_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    try:
        profiles = tomllib.loads(profiles_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def nightly_runs(api_url: str | None, timeout: float, now: datetime) -> dict[str, Any]:
    """The last finished nightly run and the next scheduled one, or why they are unknown."""
    if not api_url:
        return {"server": None, "error": "no Prefect server (PREFECT_API_URL is not set)"}
    try:
        with httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout) as client:
            client.get("/health").raise_for_status()
            last = _first_run(client, FINAL_STATES, "START_TIME_DESC")
            upcoming = _first_run(client, ["SCHEDULED"], "EXPECTED_START_TIME_ASC")
            decision = _decision(client, last["id"]) if last else None
    except httpx.HTTPError as exc:
        return {"server": api_url, "error": f"no Prefect server at {api_url} ({type(exc).__name__}: {exc})"}
    return {
        "server": api_url,
        "error": None,
        "last_run": _describe(last, decision, now) if last else None,
        "next_run": _describe(upcoming, None, now) if upcoming else None,
    }


def _first_run(client: httpx.Client, states: list[str], sort: str) -> dict[str, Any] | None:
    runs = client.post("/flow_runs/filter", json={
        "flows": {"name": {"any_": [NIGHTLY_FLOW]}},
        "flow_runs": {"state": {"type": {"any_": states}}},
        "sort": sort,
        "limit": 1,
    })
    runs.raise_for_status()
    found = runs.json()
    return found[0] if found else None


def _decision(client: httpx.Client, flow_run_id: str) -> str | None:
    """What the run decided, from its report artifact (a run that never reported has none)."""
    found = client.post("/artifacts/filter", json={
        "artifacts": {"key": {"any_": [REPORT_KEY]}, "flow_run_id": {"any_": [flow_run_id]}},
        "limit": 1,
    })
    found.raise_for_status()
    artifacts = found.json()
    return decision_of(artifacts[0].get("description")) if artifacts else None


def _describe(run: dict[str, Any], decision: str | None, now: datetime) -> dict[str, Any]:
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
    }


def _seconds_between(first: str | None, second: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(second) - datetime.fromisoformat(first)).total_seconds()
    except (TypeError, ValueError):
        return None
