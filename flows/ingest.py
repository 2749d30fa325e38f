"""The ingest of a labeled batch as a Prefect flow, so each batch shows up in the dashboard.

The work is ``tasks.data.ingest.ingest_batch`` (the same function as ``fanaoi ingest``); the
flow adds retries on transient failures (an ingest rerun adds nothing twice) and a
markdown artifact with the verdict of every file that was not simply accepted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.events import emit_batch_ingested
from flows.nightly import retry_options
from flows.params import load_params
from tasks.errors import printable
from tasks.params import Params
from tasks.project_lock import project_lock

REPORT_KEY = "ingest-batch-report"


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(batch_dir: str, params: Params, push: bool, commit: bool) -> dict[str, Any]:
    """Judge every file, add the accepted ones to data/, dvc add + push."""
    from tasks.data.ingest import ingest_batch

    return ingest_batch(
        batch_dir, params, Path.cwd(), push=push, commit=commit, report=get_run_logger().info
    )


def verdict_markdown(result: dict[str, Any]) -> str:
    """Counts per verdict, the snapshot, and one row per file that was not accepted."""
    snapshot = result.get("snapshot") or {}
    lines = [
        f"# Ingest of `{result['batch']}`",
        "",
        f"- accepted: **{result['accepted']}**, rejected: **{result['rejected']}**",
        "- verdicts: " + (", ".join(f"{v} {n}" for v, n in result["counts"].items()) or "empty"),
        f"- data snapshot (data.dvc md5): `{snapshot.get('md5')}`"
        + (" (new)" if snapshot.get("changed") else " (unchanged)"),
        f"- full report: `{result['report_path']}`",
    ]
    others = [row for row in result["files"] if row["verdict"] != "accepted"]
    if others:
        lines += ["", "| file | class | verdict | reason |", "|---|---|---|---|"]
        lines += [
            f"| `{printable(row['path'])}` | {row['class_name'] or '-'} | {row['verdict']} | "
            f"{printable(row['reason']).replace('|', '/')} |"
            for row in others
        ]
    return "\n".join(lines) + "\n"


@flow(name="ingest-batch")
def ingest_batch_flow(
    batch_dir: str, params_path: str = "params.yaml", push: bool = True, commit: bool = False
) -> dict[str, Any]:
    """Add a labeled batch (GO/, NG/ folders) to the project of ``params_path``."""
    params_file = Path(params_path).resolve()
    params = load_params(params_file)
    batch = str(Path(batch_dir).resolve())
    with (
        project_lock(params_file.parent, f"ingest-batch flow {batch}", params.lock.timeout),
        contextlib.chdir(params_file.parent),
    ):
        result = ingest_task.with_options(**retry_options(params.nightly))(
            batch, params, push, commit
        )
    emit_batch_ingested(params.nightly.project, result)
    create_markdown_artifact(
        verdict_markdown(result), key=REPORT_KEY,
        description=f"ingest: {result['accepted']} accepted, {result['rejected']} rejected",
    )
    return result
