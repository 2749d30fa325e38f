"""Commands on the data set: demo data, validation, the DVC snapshot, ingesting a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli import Commit, NoPush, Reports, command, log, params_file
from tasks.errors import printable
from tasks.params import Params


def draw_demo_data(params: Params, directory: Path, count: int | None = None, seed: int | None = None) -> str:
    """Draw the demo data set (``count`` and ``seed`` default to params' demo section); says what it drew."""
    from tasks.data.demo_set import generate_demo_dataset

    demo = params.demo
    counts = generate_demo_dataset(
        directory, count=demo.count if count is None else count, seed=demo.seed if seed is None else seed,
        size=demo.size, ng_fraction=demo.ng_fraction, classes=params.data.classes,
    )
    return ", ".join(f"{n} {name}" for name, n in counts.items()) + f" images in {directory}"


@command("demo-data", locked=True)
def _demo_data(
    params: Params,
    directory: Annotated[Path | None, typer.Argument(help="output folder (default: data.dir)")] = None,
    count: Annotated[int | None, typer.Option(help="number of images (default: demo.count)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: demo.seed)")] = None,
) -> int:
    """Draw a synthetic GO/NG fan image data set."""
    print(draw_demo_data(params, directory or Path(params.data.dir), count, seed))
    return 0


@command("validate", locked=True)
def _validate(
    params: Params,
    directory: Annotated[Path | None, typer.Argument(help="data folder (default: data.dir)")] = None,
    reports: Reports = None,
) -> int:
    """Check every file of the data set (Great Expectations); exit 1 if a blocking rule fails."""
    from tasks.data.validate import run_validate
    from tasks.params import replace

    if directory:
        params = replace(params, data=replace(params.data, dir=str(directory)))
    reports = Path(reports or params.paths.reports)
    result = run_validate(params, reports, report=print)
    print(f"report: {reports / 'validation.json'}, page: {result['page']}")
    return 0


@command("snapshot", locked=True)
def _snapshot(params: Params, no_push: NoPush = False, commit: Commit = False) -> int:
    """dvc add + dvc push the data folder."""
    from tasks.data.snapshot import commit_command, commit_message, commit_snapshot, snapshot_data

    result = snapshot_data(
        Path("."), params.data.dir, push=not no_push, stamp_dir=params.validate.cache_dir,
    )
    state = "new" if result["changed"] else "unchanged"
    pushed = "pushed to the DVC remote" if result["pushed"] else "not pushed (--no-push)"
    print(f"data snapshot {result['md5']} ({state}), {pushed}")
    if commit and commit_snapshot(Path("."), commit_message(result["md5"]), params.data.dir):
        print(f"committed {params.data.dir}.dvc")
    elif result["changed"]:
        print(f"record it in git: {commit_command(params.data.dir, result['md5'])}")
    return 0


@command("ingest", locked=True)
def _ingest(
    params: Params,
    ctx: typer.Context,
    *,
    batch_dir: Annotated[Path, typer.Argument(help="batch folder laid out like the data set")],
    no_push: NoPush = False,
    commit: Commit = False,
    flow: Annotated[bool, typer.Option("--flow", help="run as the Prefect flow ingest-batch (dashboard)")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="print only the files that need attention")] = False,
) -> int:
    """Add a labeled batch (GO/, NG/ folders) to the data set, with a verdict per file.

    Exit code 2 when some file was rejected (the accepted ones were still added).
    """
    from tasks.data.ingest import ACCEPTED, DUPLICATE, DUPLICATE_IN_BATCH, IGNORED, ingest_batch

    if flow:
        from flows.prefect_env import use_offline_defaults

        use_offline_defaults()
        from flows.ingest import ingest_batch_flow

        result = ingest_batch_flow(str(batch_dir), str(params_file(ctx)), push=not no_push, commit=commit)
    else:
        result = ingest_batch(batch_dir, params, Path("."), push=not no_push, commit=commit, report=log.info)
        _announce_batch(params, result)
    fine = (ACCEPTED, DUPLICATE, DUPLICATE_IN_BATCH, IGNORED)
    for row in result["files"]:
        if row["verdict"] == ACCEPTED and not quiet:
            print(f"{ACCEPTED}: {printable(row['path'])} -> {row['stored_as']}")
        elif row["verdict"] not in fine or not quiet:
            print(f"{row['verdict']}: {printable(row['path'])}: {printable(row['reason'])}")
    print(", ".join(f"{n} {verdict}" for verdict, n in result["counts"].items()) or "empty batch",
          f"-> report {printable(result['report_path'])}")
    snapshot = result["snapshot"]
    if snapshot:
        print(f"data snapshot {snapshot['md5']} ({'new' if snapshot['changed'] else 'unchanged'})")
        if result["committed"]:
            print(f"committed {params.data.dir}.dvc")
        elif snapshot["changed"]:
            print(f"record it in git: {result['commit_command']}")
    return 2 if result["rejected"] else 0


def _announce_batch(params: Params, result: dict) -> None:
    """Tell the Prefect server, when there is one, that new images arrived (its trigger retrains)."""
    from flows.status import configured_api_url

    if not result["accepted"] or not configured_api_url():
        return  # importing Prefect only to learn there is no server costs seconds
    from flows.prefect_env import use_offline_defaults

    use_offline_defaults()
    from flows.events import emit_batch_ingested

    if emit_batch_ingested(params.nightly.project, result):
        print(f"event fanaoi.batch.ingested sent to {configured_api_url()}")
