"""How the commands print results: decisions, defect types, the history and status screens."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import printable


def print_defect_types(metrics: dict) -> None:
    """The escape rate's 95 % upper bound, then one line per defect type (NG subfolder)."""
    from tasks.inference.metrics import defect_type_lines

    if "escape_rate_upper95" in metrics:
        print(f"escape rate 95 % upper bound {metrics['escape_rate_upper95']:.4f}")
    for line in defect_type_lines(metrics):
        print(f"  {line}")


def print_decision(result: dict) -> None:
    print(f"decision: {result['decision'].upper()}  ({result['metric']}, threshold {result['threshold']:.4f}: "
          f"{result['threshold_source']})")
    for reason in result["reasons"]:
        print(f"  - {reason}")


def history_why(entry: dict) -> str:
    """A rejection shows the rules that failed; an override or a rollback the operator's reason.

    A gate decision taken at the ceiling (the primary metric saturated) says so: the metric column
    then holds the metric that decided, and a rejection there may be a tie, not a worse candidate.
    """
    reasons = entry.get("reasons", [])
    ceiling = f"{entry['metric']} decided, the primary metric saturated" if entry.get("saturated") else ""
    if entry["action"] == "promote":
        return "; ".join(filter(None, ("every rule passed", ceiling)))
    failed = "; ".join(entry.get("failed", [])) if entry["action"] == "reject" else ""
    if entry.get("tie"):
        failed = f"tie at the ceiling ({ceiling}): {failed}"
    return failed or (reasons[-1] if reasons else "")


# (label, key, divisor, format): sizes and speed change by a ratio; the rates below by a difference
PRUNE_SIZES = (("parameters", "parameters", 1, ",.0f"), ("file size (KB)", "file_bytes", 1024, ",.1f"),
               ("predict images/s", "images_per_second", 1, ",.0f"))
PRUNE_RATES = ("validation accuracy", "escape rate", "overkill rate")


def status_lines(state: dict) -> list[tuple[str, str]]:
    """One screen: champion, damaged files, last and next nightly run, data, agreement."""
    from flows.project_status import INDEX

    champion, prefect, data = state["champion"], state["prefect"], state["data"]
    lines = [("champion", _champion_line(champion))]
    lines += [("DAMAGED", problem) for problem in data["problems"].values()]
    if prefect["error"]:
        lines.append(("nightly", prefect["error"]))
    else:
        last, upcoming = prefect["last_run"], prefect["next_run"]
        lines.append(("last night", _run_line(last) if last else "no finished nightly-retrain run on the server"))
        if last:
            lines.append(("", last["url"]))
        lines.append(("next night", f"{upcoming['start']} (in {_duration(upcoming['starts_in_seconds'])})"
                      if upcoming else "none scheduled (is `fanaoi serve` or a deployment with its cron running?)"))
    if rejected := state["last_reject"]:
        lines.append(("last reject", f"{rejected['time']}: {printable(history_why(rejected))}"))
    lines.append(("data", f"snapshot {data['snapshot'] or 'none'}; last trained on "
                          f"{data['trained_snapshot'] or 'nothing yet'}"))
    pending = data["pending_batches"]
    if INDEX in data["problems"]:
        lines.append(("new batches", "unknown: the ingest index is damaged (see above)"))
    elif pending is None:
        lines.append(("new batches", "unknown: the trained snapshot's listing is not in the DVC cache (`dvc fetch`)"))
    else:
        lines.append(("new batches", "none since the last training" if not pending else "; ".join(
            f"{Path(row['batch']).name} ({row['images']} images, {row['ingested_at']})" for row in pending
        ) + " (not trained on yet)"))
    for check in state["agreement"]:
        lines.append(("agree" if check["ok"] else "DISAGREE", f"{check['check']}: {check['detail']}"))
    return lines


def _champion_line(champion: dict | None) -> str:
    if champion is None:
        return "none yet (the first promoted candidate becomes v0001)"
    if champion["problem"]:
        return f"{champion['version'] or '?'} UNUSABLE: {champion['problem']}"
    metrics = "  ".join(f"{name} {value:.4f}" for name, value in champion["metrics"].items())
    threshold = champion["threshold"]
    return (f"{champion['version']}  published {champion['published']} ({_duration(champion['age_seconds'])} "
            f"ago, {champion['action']})  {metrics}  threshold "
            f"{'-' if threshold is None else f'{threshold:.4f}'}")


def _run_line(run: dict) -> str:
    took = f"took {_duration(run['duration_seconds'])}" if run["duration_seconds"] is not None else "running"
    decision = f"decision {run['decision']}" if run["decision"] else "no report"
    message = f"  ({printable(run['message'])})" if run["message"] and run["state"] != "COMPLETED" else ""
    # The state's name, not its type: TimedOut is a Failed-type state, Promoted a Completed-type one.
    return f"{run['state_name'] or run['state']}  started {run['start']}  {took}  {decision}{message}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    shown = [f"{value} {unit}" for value, unit in parts if value][:2]
    return " ".join(shown) or "0 s"
