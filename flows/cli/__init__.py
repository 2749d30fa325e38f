"""The ``fanaoi`` command line: the Typer app, its global options and ``command``, which registers
the commands of ``data``, ``model``, ``registry`` and ``line``, each a thin layer over ``tasks``.

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
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_expected_error_without_traceback)


def _expected_error_without_traceback(record: logging.LogRecord) -> bool:
    """Print an expected error (it names the file and the fix) without the traceback Prefect's
    engine logs with it: the command's one error line follows, and the traceback stays in the
    dashboard's log, whose handler saw the record first. ``-v`` keeps it here too."""
    if record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS):
        record.exc_info, record.exc_text = None, None
    return True


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
    """The ``--params`` file; its folder is the project."""
    return Path(ctx.find_root().params["params"])


def _project_lock(root: typer.Context, params: Params) -> contextlib.AbstractContextManager[None]:
    """The lock of the project the command runs in (the cwd's), whichever params file it read."""
    from tasks.project_lock import project_lock, project_root

    holder = printable(" ".join(["fanaoi", *root.obj]))
    return project_lock(project_root(), holder, params.lock.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fanaoi ARGV``; returns the exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="fanaoi", obj=args)
    except SystemExit as exc:  # every command ends with typer.Exit(code); usage errors exit 2
        return exc.code if isinstance(exc.code, int) else 0
    return 0


# The command modules register their commands when imported, so they come after `command`.
from flows.cli import data, line, model, registry  # noqa: E402, F401

# `fanaoi --help` lists the commands in this order, the stages first, not module by module.
HELP_ORDER = (
    "demo-data", "validate", "train", "evaluate", "snapshot", "ingest", "gate", "promote", "champion", "history",
    "rollback", "prune", "predict", "export", "serve-model", "explain", "plots-template", "retrain", "serve",
    "status", "alerts", "server",
)
app.registered_commands.sort(key=lambda info: HELP_ORDER.index(info.name))
