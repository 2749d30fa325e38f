"""The nightly run's page in the Prefect dashboard, as markdown, and the rows of its tables.

Formatting only: the flow gathers the run's summary (flows/nightly.py ``summarize``) and
publishes what this module writes as artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TABLE_METRICS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1",
    "escape_rate", "escape_rate_upper95", "overkill_rate", "review_rate", "auc", "log_loss",
)


def metric_rows(gate: dict[str, Any]) -> list[dict[str, Any]]:
    """Candidate vs champion on the gate's validation images, one row per metric."""
    candidate = gate.get("candidate", {}).get("metrics", {})
    champion = gate.get("champion", {}).get("metrics") or {}
    rows = []
    for name in TABLE_METRICS:
        if name not in candidate:
            continue
        ours, theirs = candidate[name], champion.get(name)
        delta = ours - theirs if ours is not None and theirs is not None else None
        rows.append({
            "metric": name, "candidate": _rounded(ours), "champion": _rounded(theirs),
            "delta": _rounded(delta),
        })
    return rows



def defect_type_rows(gate: dict[str, Any]) -> list[dict[str, Any]]:
    """Escapes per defect type on the gate's validation images: candidate, and champion's rate."""
    candidate = gate.get("candidate", {}).get("metrics", {}).get("defect_types", {})
    champion = (gate.get("champion", {}).get("metrics") or {}).get("defect_types", {})
    return [
        {
            "defect_type": kind, "images": row["count"], "escapes": row["escapes"],
            "escape_rate": _rounded(row["escape_rate"]),
            "escape_rate_upper95": _rounded(row["escape_rate_upper95"]),
            "champion_escape_rate": _rounded(champion.get(kind, {}).get("escape_rate")),
        }
        for kind, row in candidate.items()
    ]



def defect_type_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of :func:`defect_type_rows`."""
    if not rows:
        return []
    lines = [
        "## Escapes per defect type (validation)",
        "",
        "| defect type | images | escapes | escape rate | 95 % upper bound | champion |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        champion = "-" if row["champion_escape_rate"] is None else f"{row['champion_escape_rate']:.4f}"
        lines.append(
            f"| {row['defect_type']} | {row['images']} | {row['escapes']} | {row['escape_rate']:.4f} "
            f"| {row['escape_rate_upper95']:.4f} | {champion} |"
        )
    return [*lines, ""]



def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)



def report_markdown(summary: dict[str, Any]) -> str:
    """The run's page in the dashboard: decision, reasons, snapshot, evaluate vs the kept epoch."""
    decision = summary["decision"]
    lines = [f"# Nightly retrain: {decision.upper()}", ""]
    if decision == "unchanged":
        lines.append(
            f"No new gate decision ({unchanged_why(summary['stages'])}). Last decision: "
            f"**{summary['last_decision'] or 'none yet'}**."
        )
    elif summary["published_version"]:
        lines.append(
            f"Published **{summary['published_version']}** as `{summary['champion_path']}`."
        )
    else:
        lines.append(f"Candidate `{summary['candidate_path']}` not published.")
    lines += [
        "",
        f"- champion: {summary['champion_version'] or 'none'}",
        *explain_lines(summary["champion_version"], summary["reports_dir"], summary["reports_url"]),
        *validation_lines(summary["reports_dir"], summary["reports_url"]),
        f"- data snapshot (data.dvc md5): `{summary['data_snapshot']}`"
        + (" (new)" if summary["data_changed"] else ""),
        "- stages: " + ", ".join(f"{name} {state}" for name, state in summary["stages"].items()),
        *threshold_lines(summary),
        *deciding_lines(summary),
        "",
        "## Reasons",
        "",
        *[f"- {reason}" for reason in summary["reasons"] or ["(no gate decision yet)"]],
        "",
        *defect_type_table(summary.get("defect_types", [])),
        *evaluate_vs_kept_epoch_table(summary["kept_epoch_vs_evaluate"]),
    ]
    return "\n".join(lines) + "\n"


def deciding_lines(summary: dict[str, Any]) -> list[str]:
    """Which metric decided, when the primary one had saturated and could no longer tell the models apart."""
    if not summary.get("saturated") or summary["decision"] == "unchanged":  # no gate ran tonight
        return []
    return [f"- decided on **{summary['deciding_metric']}**: the primary metric has saturated (see the reasons)"]


def unchanged_why(stages: dict[str, str]) -> str:
    """Why a run made no gate decision, naming the stages that did run (a changed input of
    validate can leave its manifest, and so every later stage, as dvc.lock records it)."""
    ran = [name for name, state in stages.items() if state == "ran"]
    if not ran:
        return "no stage ran: data, params and code as in dvc.lock"
    current = [name for name, state in stages.items() if state != "ran"]
    return f"{', '.join(ran)} ran; {', '.join(current)} as in dvc.lock: no new candidate to gate"


def threshold_lines(summary: dict[str, Any]) -> list[str]:
    """The NG threshold in service (the champion's) and, on a night the gate rejected, the
    candidate's, each with where it came from (calibration or its fallback)."""
    lines = []
    if summary.get("champion_threshold") is not None:
        lines.append(f"- NG threshold of the champion {summary['champion_threshold']:.4f}: "
                     f"{summary.get('champion_threshold_source') or 'source not recorded'}")
    if summary["decision"] == "reject" and summary.get("threshold") is not None:
        lines.append(f"- NG threshold of the rejected candidate {summary['threshold']:.4f}: "
                     f"{summary['threshold_source']}")
    return lines



def validation_lines(reports_dir: str, reports_url: str) -> list[str]:
    """A link to the validation page; the validate stage writes it even when it blocks the run."""
    from tasks.data.validate import VALIDATION_PAGE

    page = Path(reports_dir) / VALIDATION_PAGE
    if not page.is_file():
        return []
    return [f"- validation report: [{page}]({reports_url}/{VALIDATION_PAGE}) (served by `fanaoi serve-model`)"]



def explain_lines(version: str | None, reports_dir: str, reports_url: str) -> list[str]:
    """A link to the champion's explain report, or the command that writes it.

    The link is the page as `fanaoi serve-model` serves it (``reports_url``): a file://
    path opens only on the machine that wrote it, not in an operator's browser elsewhere.
    The flow draws the page after each promotion (a few seconds on the demo set); a champion
    whose page could not be drawn, or published before, gets the command that draws it.
    """
    if version is None:
        return []
    page = f"explain/{version}/index.html"
    report = Path(reports_dir) / page
    if report.is_file():
        return [f"- look inside {version}: [{report}]({reports_url}/{page}) (served by `fanaoi serve-model`)"]
    return [f"- look inside {version}: `fanaoi explain {version}` writes {report}"]


def evaluate_vs_kept_epoch_table(comparison: dict[str, Any]) -> list[str]:
    """Markdown rows: the kept epoch's logged numbers beside evaluate() on its weights."""
    if not comparison:
        return []
    epoch = comparison.get("kept_epoch", "kept")
    rows = [
        f"## evaluate() vs epoch {epoch} (the weights kept: the latest epoch within train.keep_tolerance "
        "of the lowest validation loss)",
        "",
        f"| | epoch {epoch} as logged | evaluate() |",
        "|---|---|---|",
    ]
    for split in ("train", "validation"):
        for measure in ("accuracy", "loss"):
            logged = comparison[f"kept_epoch_{split}_{measure}"]
            measured = comparison[f"evaluate_{split}_{measure}"]
            rows.append(f"| {split} {measure} | {logged:.4f} | {measured:.4f} |")
    rows += [
        "",
        f"- validation accuracy gap: {comparison['validation_accuracy_gap']:.4f}"
        + (" **FLAGGED** (above evaluate.max_gap)" if comparison["validation_gap_flag"] else ""),
        f"- train - validation gap: {comparison['train_validation_gap']:.4f}"
        + (" **FLAGGED** (above evaluate.max_overfit)" if comparison["overfit_flag"] else ""),
    ]
    return rows


def failure_markdown(message: str, stages: dict[str, bool], links: list[str]) -> str:
    """The page of a failed night: why, which stages ran before, and that the champion stayed."""
    done = ", ".join(f"{name} {'ran' if ran else 'skipped'}" for name, ran in stages.items())
    return (
        f"# Nightly retrain: FAILED\n\n{message}\n\n- stages before the failure: {done or 'none'}\n"
        f"- the champion is unchanged\n" + "".join(f"{line}\n" for line in links)
    )
