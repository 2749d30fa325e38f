"""The ``fanaoi`` command line: a thin layer over ``tasks``, one function per command.

Heavy packages (TensorFlow, Great Expectations, Prefect, DVC) are imported inside the
commands that need them, so ``fanaoi --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.params import DEFAULT_PARAMS, load_params
from tasks.errors import FanaoiError, printable
from tasks.params import Params

log = logging.getLogger("fanaoi")

# Errors a user can fix: printed as one line, exit 1, no traceback. OSError carries the
# file name (disk full, permission denied, missing file).
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FanaoiError, OSError)


app = typer.Typer(
    name="fanaoi", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="FanAOI: retrain, check and publish the GO/NG fan inspection model.",
)

Model = Annotated[Path | None, typer.Option(help="candidate model (default: paths.candidate)")]
Reports = Annotated[Path | None, typer.Option(help="reports folder (default: paths.reports)")]
NoPush = Annotated[bool, typer.Option("--no-push", help="snapshot locally, skip dvc push")]
Commit = Annotated[bool, typer.Option("--commit", help="git commit data.dvc afterwards")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]
Version = Annotated[str | None, typer.Argument(help="registry version, e.g. v0003 or 3 (default: the champion)")]


@app.callback()
def _options(
    params: Annotated[Path, typer.Option(help="params file")] = DEFAULT_PARAMS,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug logging")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Prefect's client logs every API request at INFO, DVC every dvc.lock update (twice,
    # through its own handler too): noise between the epoch lines.
    for chatty in ("httpx", "dvc"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)


def command(name: str, *, locked: bool = False) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register ``function(params, **options)`` as ``fanaoi NAME``, its docstring as its help.

    Params.yaml is read, the project lock held when ``locked`` (the command changes data/, its
    snapshot, the stage outputs or the registry), and an expected error is one line, exit 1.
    """

    def register(function: Callable[..., int]) -> Callable[..., int]:
        signature = inspect.signature(function, eval_str=True)

        @functools.wraps(function)
        def run(ctx: typer.Context, **options: Any) -> None:
            root = ctx.find_root()
            if "ctx" in signature.parameters:
                options["ctx"] = ctx
            try:
                params = load_params(root.params["params"])
                # `ingest --flow` runs a flow, which takes the lock itself.
                with _project_lock(root, params) if locked and not options.get("flow") else contextlib.nullcontext():
                    code = function(params, **options)
            except EXPECTED_ERRORS as exc:
                print(f"fanaoi {name}: error: {printable(str(exc))}", file=sys.stderr)
                code = 1
            except (KeyboardInterrupt, typer.Abort):
                print(f"fanaoi {name}: interrupted", file=sys.stderr)
                code = 130
            raise typer.Exit(code)

        # Typer reads the options from the signature; params is ours to pass, not an option,
        # and the one context Typer injects (found by its type) tells where the params file is.
        options = [p for p in signature.parameters.values() if p.name not in ("params", "ctx")]
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        run.__signature__ = signature.replace(parameters=[*options, context])
        app.command(name)(run)
        return function

    return register


def params_file(ctx: typer.Context) -> Path:
    return Path(ctx.find_root().params["params"])


def _project_lock(root: typer.Context, params: Params) -> contextlib.AbstractContextManager[None]:
    """The project lock; the project is the params file's folder."""
    from tasks.project_lock import project_lock

    holder = printable(" ".join(["fanaoi", *root.obj]))
    return project_lock(params_file(root).resolve().parent, holder, params.lock.timeout)


def draw_demo_data(params: Params, directory: Path, count: int | None = None, seed: int | None = None) -> str:
    """Draw the demo data set (``count`` and ``seed`` default to params' demo section); says what it drew."""
    from tasks.data.demo_data import generate_demo_dataset

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fanaoi ARGV``; returns the exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="fanaoi", obj=args)
    except SystemExit as exc:  # every command ends with typer.Exit(code); usage errors exit 2
        return exc.code if isinstance(exc.code, int) else 0
    return 0


# The command modules register their commands when imported, so they come after `command`.
from flows.cli import line, model, registry  # noqa: E402, F401

# `fanaoi --help` lists the commands in this order, the stages first, not module by module.
HELP_ORDER = (
    "demo-data", "validate", "train", "evaluate", "snapshot", "ingest", "gate", "promote", "champion", "history",
    "rollback", "prune", "predict", "export", "serve-model", "explain", "plots-template", "retrain", "serve",
    "status", "alerts", "server",
)
app.registered_commands.sort(key=lambda info: HELP_ORDER.index(info.name))
