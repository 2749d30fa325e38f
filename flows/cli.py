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
from typing import Annotated, Any, Literal

import typer

from flows.params import DEFAULT_PARAMS, load_params
from tasks.errors import FanaoiError, printable
from tasks.params import Params

log = logging.getLogger("fanaoi")

# Errors a user can fix: printed as one line, exit 1, no traceback. OSError carries the
# file name (disk full, permission denied, missing file).
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FanaoiError, OSError)

# What `fanaoi gate --no-publish` writes instead of gate.json, the gate stage's DVC metric.
PREVIEW_REPORT = "gate-preview.json"
DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"

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


def _params_path(ctx: typer.Context) -> Path:
    return Path(ctx.find_root().params["params"])


def _project_lock(root: typer.Context, params: Params) -> contextlib.AbstractContextManager[None]:
    """The lock of the project the command runs in (the cwd's), whichever params file it read."""
    from tasks.project_lock import project_lock, project_root

    holder = printable(" ".join(["fanaoi", *root.obj]))
    return project_lock(project_root(), holder, params.lock.timeout)


def _draw_demo_data(params: Params, directory: Path, count: int | None = None, seed: int | None = None) -> str:
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
    print(_draw_demo_data(params, directory or Path(params.data.dir), count, seed))
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


@command("train", locked=True)
def _train(params: Params, model: Model = None, reports: Reports = None) -> int:
    """Train a candidate model on the train split."""
    from tasks.model.train import run_train

    model, reports = params.paths.chosen(model, reports)
    summary = run_train(params, model, reports)
    kept = summary["kept_epoch_metrics"]
    print(
        f"candidate: {model}  epoch {summary['kept_epoch']} of {summary['epochs']} kept: accuracy "
        f"{kept['accuracy']:.4f}, val_accuracy {kept['val_accuracy']:.4f}  ({summary['seconds']:.0f}s)"
    )
    return 0


@command("evaluate", locked=True)
def _evaluate(params: Params, model: Model = None, reports: Reports = None) -> int:
    """Score the candidate; compare evaluate() with the kept epoch."""
    from tasks.model.evaluate import run_evaluate

    model, reports = params.paths.chosen(model, reports)
    result = run_evaluate(params, model, reports)
    validation, comparison = result["validation"], result["kept_epoch_vs_evaluate"]
    print(
        f"validation accuracy {validation['accuracy']:.4f}  escape {validation['escape_rate']:.4f}  "
        f"overkill {validation['overkill_rate']:.4f}  review {validation['review_rate']:.4f}  "
        f"threshold {validation['threshold']:.4f}  evaluate-vs-kept-epoch gap "
        f"{comparison['validation_accuracy_gap']:.4f}  -> {reports / 'evaluation.json'}"
    )
    _print_defect_types(validation)
    return 0


def _print_defect_types(metrics: dict) -> None:
    """The escape rate's 95 % upper bound, then one line per defect type (NG subfolder)."""
    from tasks.model.evaluate import defect_type_lines

    if "escape_rate_upper95" in metrics:
        print(f"escape rate 95 % upper bound {metrics['escape_rate_upper95']:.4f}")
    for line in defect_type_lines(metrics):
        print(f"  {line}")


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

        result = ingest_batch_flow(str(batch_dir), str(_params_path(ctx)), push=not no_push, commit=commit)
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


def _print_decision(result: dict) -> None:
    print(f"decision: {result['decision'].upper()}  ({result['metric']}, threshold {result['threshold']:.4f}: "
          f"{result['threshold_source']})")
    for reason in result["reasons"]:
        print(f"  - {reason}")


@command("gate", locked=True)
def _gate(
    params: Params,
    no_publish: Annotated[bool, typer.Option(
        "--no-publish", help=f"decide only, publish and log nothing: the report goes to REPORTS/{PREVIEW_REPORT}")
    ] = False,
    model: Model = None,
    reports: Reports = None,
) -> int:
    """Candidate vs champion: promote (and publish) or reject."""
    from tasks.registry.gate import run_gate
    from tasks.registry.publish import publish

    model, reports = params.paths.chosen(model, reports)
    if no_publish:
        result = run_gate(params, model, reports, record=False, report_file=PREVIEW_REPORT)
        _print_decision(result)
        print(f"report: {reports / PREVIEW_REPORT} (nothing published or logged; "
              f"{reports / 'gate.json'}, the DVC metric, unchanged)")
        return 0
    result = run_gate(params, model, reports)
    _print_decision(result)
    if result["decision"] == "promote":
        card = publish(model, result, params, repo_dir=".")
        print(f"published {card['version']}: {Path(params.registry.dir) / 'champion.h5'}")
    return 0


@command("promote", locked=True)
def _promote(
    params: Params,
    reason: Annotated[str, typer.Option(help="why; goes to the card and the log")],
    force: Annotated[bool, typer.Option("--force", help="publish without asking (scripts)")] = False,
    model: Model = None,
    reports: Reports = None,
) -> int:
    """Publish the candidate whatever the gate says (logged as forced); asks first unless --force."""
    from tasks.registry.gate import run_gate
    from tasks.registry.publish import publish

    model, reports = params.paths.chosen(model, reports)
    result = run_gate(params, model, reports, record=False)
    _print_decision(result)
    if not force and not typer.confirm(f"publish {model} over this decision?", err=True):
        print("not published")
        return 1
    card = publish(model, result, params, repo_dir=".", force_reason=reason)
    print(f"forced {card['version']} (reason: {reason}): {Path(params.registry.dir) / 'champion.h5'}")
    return 0


@command("champion")
def _champion(params: Params, as_json: AsJson = False) -> int:
    """Show the champion's model card (--json: all of it)."""
    import json

    from tasks.registry.champion import champion_card

    card = champion_card(params.registry.dir)
    if as_json:
        print(json.dumps(card, indent=2))
        return 0
    validation, positive = card["metrics"]["validation"], card["positive_class"]
    print(f"champion {card['version']}  {Path(params.registry.dir) / 'champion.h5'}")
    for key, value in (
        ("published", f"{card['time']} ({card['action']}{': ' + card['reason'] if card['reason'] else ''})"),
        ("data snapshot", card["data_snapshot"]),
        ("git revision", card["git_revision"]),
        ("classes", ", ".join(f"{name}={label}" for name, label in card["class_mapping"].items())),
        ("input", f"{card['input_size'][0]}x{card['input_size'][1]} {card['preprocessing']['color_mode']}"),
        ("threshold", f"{card['threshold']:.4f} (p({positive}) >= threshold -> {positive})"),
        ("review band", "[{:.4f}, {:.4f}) -> REVIEW".format(*card["review_band"]) if card.get("review_band")
         else "none"),
        ("validation", f"accuracy {validation['accuracy']:.4f}  escape {validation['escape_rate']:.4f}  "
                       f"overkill {validation['overkill_rate']:.4f}  on {validation['count']} images"),
    ):
        print(f"  {key + ':':15}{value}")
    return 0


def _history_why(entry: dict) -> str:
    """A rejection shows the rules that failed; an override or a rollback the operator's reason."""
    reasons = entry.get("reasons", [])
    if entry["action"] == "promote":
        return "every rule passed"
    failed = "; ".join(entry.get("failed", [])) if entry["action"] == "reject" else ""
    return failed or (reasons[-1] if reasons else "")


@command("history")
def _history(
    params: Params,
    at: Annotated[str | None, typer.Option(metavar="TIME", help="ISO 8601, e.g. 2026-11-20T03:00")] = None,
) -> int:
    """Every gate decision, promotion and rollback; --at: which version was champion at TIME."""
    from tasks.registry.decisions import champion_at, parse_time, read_log

    if at:
        entry = champion_at(params.registry.dir, parse_time(at))
        found = f"{entry['version']} ({entry['action']} at {entry['time']})" if entry else "none"
        print(f"champion at {at}: {found}")
        return 0
    print(f"{'time':26}{'action':9}{'version':8}{'previous':9}{'metric':20}{'escape':8}{'overkill':9}why")
    for entry in read_log(params.registry.dir):
        why = _history_why(entry)
        metric = f"{entry['metric']} {entry['value']:.4f}" if entry.get("value") is not None else "-"
        rates = [f"{entry[k]:.4f}" if k in entry else "-" for k in ("escape_rate", "overkill_rate")]
        print(f"{entry['time']:26}{entry['action']:9}{entry.get('version') or '-':8}"
              f"{entry.get('previous') or '-':9}{metric:20}{rates[0]:8}{rates[1]:9}{why}")
    return 0


@command("rollback", locked=True)
def _rollback(
    params: Params,
    version: Annotated[str, typer.Argument(help="e.g. v0003 or 3 (see `fanaoi history`)")],
    reason: Annotated[str | None, typer.Option(help="why; goes to the log")] = None,
) -> int:
    """Make an earlier published version the champion again."""
    from tasks.registry.decisions import rollback

    card = rollback(params.registry, version, reason)
    print(f"champion is now {card['version']}: {Path(params.registry.dir) / 'champion.h5'}")
    return 0


# (label, key, divisor, format): sizes and speed change by a ratio; the rates below by a difference
_PRUNE_SIZES = (("parameters", "parameters", 1, ",.0f"), ("file size (KB)", "file_bytes", 1024, ",.1f"),
                ("predict images/s", "images_per_second", 1, ",.0f"))
_PRUNE_RATES = ("validation accuracy", "escape rate", "overkill rate")


@command("prune")
def _prune(
    params: Params,
    *,
    fraction: Annotated[float | None, typer.Option(help="share of filters removed (default: prune.fraction)")] = None,
    model: Model = None,
    out: Annotated[Path | None, typer.Option(help="pruned candidate (default: paths.candidate)")] = None,
    epochs: Annotated[int | None, typer.Option(help="fine-tune epochs (default: prune.fine_tune_epochs)")] = None,
    reports: Reports = None,
) -> int:
    """Remove the weakest Conv2D filters (L1 norm), fine-tune, compare before/after."""
    from tasks.model.prune import run_prune

    model, reports = params.paths.chosen(model, reports)
    result = run_prune(params, model, out, reports, fraction=fraction, epochs=epochs)
    print("pruned " + ", ".join(f"{row['layer']} {row['filters_before']}->{row['filters_after']}"
                                for row in result["layers"])
          + f" filters; accuracy before fine-tuning {result['pruned_not_fine_tuned']['validation_accuracy']:.4f}, "
          f"fine-tuned {result['fine_tune_epochs']} epoch(s)")
    print(f"{'':22}{'before':>12}{'after':>12}{'change':>10}")
    for label, key, divisor, form in _PRUNE_SIZES:
        before, after = result["before"][key] / divisor, result["after"][key] / divisor
        print(f"{label:22}{before:>12{form}}{after:>12{form}}{after / before - 1:>+10.0%}")
    for label in _PRUNE_RATES:
        before, after = (result[when][label.replace(" ", "_")] for when in ("before", "after"))
        print(f"{label:22}{before:>12.4f}{after:>12.4f}{after - before:>+10.4f}")
    print(f"candidate: {result['out']} (report {reports / 'prune.json'}); "
          f"check it against the champion with `fanaoi gate --model {result['out']}`")
    return 0


@command("predict")
def _predict(
    params: Params,
    paths: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_DIR...", help="image files or folders")],
    as_json: AsJson = False,
    batch_size: Annotated[int | None, typer.Option(help="default: evaluate.batch_size")] = None,
) -> int:
    """Classify images with the champion; exit 1 when some file could not be classified."""
    import json

    from tasks.registry.predict import expand_paths, load_champion, predict_files

    files = expand_paths([str(path) for path in paths], params.data.extensions)
    predictor = load_champion(params.registry.dir)
    results = predict_files(predictor, files, batch_size or params.evaluate.batch_size, params.validate)
    if as_json:
        print(json.dumps({"champion": predictor.version, "threshold": predictor.threshold,
                          "positive_class": predictor.class_names[1], "results": results}, indent=2))
    else:
        positive = predictor.class_names[1]
        for row in results:
            outcome = f"error: {row['error']}" if row["error"] else (
                f"{row['label']}  p({positive})={row['probability']:.4f}"
            )
            print(f"{printable(row['path'])}  {printable(outcome)}")
    return 1 if any(row["error"] for row in results) else 0


@command("export", locked=True)
def _export(
    params: Params,
    target: Annotated[Literal["tflite", "onnx", "savedmodel"], typer.Option("--format")],
    version: Version = None,
) -> int:
    """Convert a registry version to TFLite, ONNX or SavedModel (checked against Keras)."""
    from tasks.model.export import export_version

    entry = export_version(params, target, version)
    print(f"exported {version or 'the champion'} as {target}: {entry['path']} "
          f"({entry['bytes'] / 1e6:.2f} MB); max abs difference from Keras {entry['max_abs_diff']:.2g} "
          f"on {entry['checked_images']} validation images ({entry['runtime']})")
    return 0


@command("serve-model")
def _serve_model(
    params: Params,
    host: Annotated[str | None, typer.Option(help="default: serve.host")] = None,
    port: Annotated[int | None, typer.Option(help="default: serve.port")] = None,
) -> int:
    """Serve the champion over HTTP (reloads a new one)."""
    from flows.serve_model import run_server

    host = host or params.serve.host
    port = params.serve.port if port is None else port
    print(f"serving the champion of {params.registry.dir} on http://{host}:{port} "
          f"(POST /predict, GET /health, GET /model, docs at /docs, "
          f"{params.serve.reports_dir}/ at /reports/)")
    run_server(params, host, port)
    return 0


@command("explain")
def _explain(
    params: Params,
    *,
    version: Version = None,
    model: Annotated[Path | None, typer.Option(metavar="PATH", help="a .h5 file instead of a version")] = None,
    image: Annotated[Path | None, typer.Option(metavar="PATH", help="for the feature maps (default: the first "
                                                                     "validation image)")] = None,
    out: Annotated[Path | None, typer.Option(metavar="DIR", help="default: REPORTS/explain/<version or file>")] = None,
    reports: Reports = None,
) -> int:
    """HTML report: filters, feature maps, Grad-CAM on the validation mistakes."""
    from tasks.model.explain import run_explain

    summary = run_explain(
        params, version=version, model_path=model, image_path=image, out_dir=out, reports_dir=reports,
        report=log.debug,
    )
    shown = len(summary["heatmaps"])
    print(f"{summary['model']}: {len(summary['escapes'])} escape(s), {len(summary['overkills'])} "
          f"overkill(s) on {summary['validation']['count']} validation images; {shown} heatmap(s)"
          + (f", {summary['left_out']} left out (explain.max_heatmaps)" if summary["left_out"] else ""))
    _print_defect_types(summary["validation"])
    print(f"report: {summary['index']}  ({summary['seconds']:.1f}s)")
    return 0


@command("plots-template")
def _plots_template(params: Params, ctx: typer.Context) -> int:
    """Write the offline page template of `dvc plots show` (.dvc/config: plots.html_template)."""
    from tasks.model.plots import configured_plots_template, write_plots_template

    template = write_plots_template(configured_plots_template(_params_path(ctx).resolve().parent / ".dvc"))
    print(f"wrote {template}: `dvc plots show` and `dvc plots diff` now draw without network")
    return 0


@command("retrain")
def _retrain(params: Params, ctx: typer.Context, no_push: NoPush = False) -> int:
    """Run the nightly flow once (demo data first if data/ is empty)."""
    from flows.prefect_env import use_offline_defaults

    params_path = _params_path(ctx).resolve()
    data_dir = params_path.parent / params.data.dir
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        demo = params.demo
        print(f"{data_dir} is empty: drawing the demo data set ({demo.count} images, seed {demo.seed})")
        _draw_demo_data(params, data_dir)
    use_offline_defaults()
    from flows.nightly import nightly_retrain

    state = nightly_retrain(params_path=str(params_path), push=not no_push, return_state=True)
    if state.is_cancelled():
        print(f"fanaoi retrain: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()  # a failed run raises its own error here
    unchanged = summary["decision"] == "unchanged"
    print(f"decision: {summary['decision'].upper()}"
          + (" (no stage ran: data, params and code as in dvc.lock)" if unchanged else ""))
    if unchanged and summary["last_decision"]:
        print(f"last gate decision: {summary['last_decision']}, because:")
    for reason in summary["reasons"]:
        print(f"  - {reason}")
    validation = summary["validation"]
    if validation:
        print(f"candidate on {validation['count']} validation images: accuracy {validation['accuracy']:.4f}, "
              f"escape rate {validation['escape_rate']:.4f}, overkill rate {validation['overkill_rate']:.4f}, "
              f"review rate {validation.get('review_rate', 0.0):.4f}")
        _print_defect_types(validation)
    print(f"champion: {summary['champion_path'] or 'none yet'} ({summary['champion_version'] or '-'})")
    print(f"candidate: {summary['candidate_path']}")
    print(f"reports: {summary['reports_path']} (evaluation.json, gate.json, history.csv)")
    return 0


@command("serve")
def _serve(params: Params, ctx: typer.Context) -> int:
    """Serve the nightly deployment on its cron and on ingests (params: nightly)."""
    from flows.prefect_env import use_offline_defaults

    use_offline_defaults()
    from prefect import serve

    from flows.nightly import nightly_deployment

    # Prefect's temporary local API has no scheduler: served there, the cron never fires.
    _require_prefect_server("scheduling the nightly runs")

    from flows.alerts import alerts_configured, install_alerts

    if alerts_configured(params.alerts):
        print(f"alerts: {', '.join(install_alerts(params.alerts))}")
    else:
        print("alerts: none (set alerts.webhook_url or alerts.block to be told when a night fails)")
    deployment = nightly_deployment(params, _params_path(ctx))
    print(f"serving nightly-retrain/{deployment.name} on cron {params.nightly.cron!r}; "
          f"run it now with `prefect deployment run nightly-retrain/{deployment.name}`")
    serve(deployment)
    return 0


@command("status")
def _status(params: Params, ctx: typer.Context, as_json: AsJson = False) -> int:
    """Champion, last and next nightly run, new data, and whether they agree."""
    import json

    from flows.project_status import now_utc, project_status
    from flows.status import configured_api_url, nightly_runs

    project = _params_path(ctx).resolve().parent
    now = now_utc()
    state = project_status(project, params.data.dir, project / params.registry.dir, now)
    state["prefect"] = nightly_runs(configured_api_url(), params.status.api_timeout, now)
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    for label, text in _status_lines(state):
        print(f"{label:12}{text}")
    return 0


def _status_lines(state: dict) -> list[tuple[str, str]]:
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
        lines.append(("next night", f"{upcoming['start']} (in {_duration(upcoming['starts_in_seconds'])})"
                      if upcoming else "none scheduled (is `fanaoi serve` or a deployment with its cron running?)"))
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
    return f"{run['state']}  started {run['start']}  {took}  {decision}{message}"


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


@command("alerts")
def _alerts(params: Params) -> int:
    """Install the alert automations on the Prefect server (params: alerts)."""
    from flows.prefect_env import use_offline_defaults

    use_offline_defaults()
    from flows.alerts import install_alerts, webhook_url

    _require_prefect_server("the alert automations")
    names = install_alerts(params.alerts)
    target = params.alerts.block or f"webhook {webhook_url(params.alerts)}"
    print(f"installed on the Prefect server, sending through {target}:")
    for name in names:
        print(f"  {name}")
    return 0


@command("server")
def _server(params: Params) -> int:
    """Start the Prefect server on PostgreSQL (PREFECT_SERVER_DATABASE_CONNECTION_URL; params: server)."""
    import os
    import socket

    url = os.environ.get(DATABASE_ENV, "")
    if not url.startswith("postgresql+asyncpg://"):
        raise FanaoiError(
            f"{DATABASE_ENV} must name the PostgreSQL database, e.g. "
            f"postgresql+asyncpg://prefect:PASSWORD@127.0.0.1:5432/prefect (README, Operating FanAOI, has "
            f"the initdb/pg_ctl recipe); got {url.split('@')[-1] if url else 'nothing'}. Without a "
            f"database, `prefect server start` keeps its state in SQLite on this machine"
        )
    server = params.server
    host = socket.gethostname() if server.host in ("0.0.0.0", "::") else server.host
    os.environ.setdefault("PREFECT_UI_API_URL", f"http://{host}:{server.port}/api")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(f"Prefect server on PostgreSQL at {url.split('@')[-1]}: API and dashboard at http://{host}:{server.port}; "
          f"elsewhere set PREFECT_API_URL=http://{host}:{server.port}/api", flush=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    # The process becomes the server, so signals (Ctrl-C, systemd stop) reach it.
    os.execv(prefect, [prefect, "server", "start", "--host", server.host, "--port", str(server.port)])


def _require_prefect_server(what: str) -> None:
    """Automations and schedules live on a server; Prefect's temporary local API forgets them."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise FanaoiError(
            f"no Prefect server for {what}: start one (`prefect server start` or `fanaoi server`) "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fanaoi ARGV``; returns the exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="fanaoi", obj=args)
    except SystemExit as exc:  # every command ends with typer.Exit(code); usage errors exit 2
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
