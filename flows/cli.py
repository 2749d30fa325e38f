"""The ``fanaoi`` command line: a thin layer over ``tasks``.

Heavy packages (TensorFlow, Great Expectations, Prefect) are imported inside the
commands that need them, so ``fanaoi --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.params import DEFAULT_PARAMS, load_params
from tasks.errors import FanaoiError, printable
from tasks.params import Params

log = logging.getLogger("fanaoi")

# Errors a user can fix: printed as one line, exit 1, no traceback. OSError carries the
# file name (disk full, permission denied, missing file).
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FanaoiError, OSError)

# What `fanaoi gate --no-publish` writes instead of gate.json, the gate stage's DVC metric.
PREVIEW_REPORT = "gate-preview.json"

Command = Callable[[argparse.Namespace, Params], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = function
        return function

    return register


@command("demo-data")
def _demo_data(args: argparse.Namespace, params: Params) -> int:
    from tasks.demo_data import generate_demo_dataset

    demo = params.demo
    counts = generate_demo_dataset(
        Path(args.directory or params.data.dir),
        count=args.count if args.count is not None else demo.count,
        seed=args.seed if args.seed is not None else demo.seed,
        size=demo.size,
        ng_fraction=demo.ng_fraction,
        classes=params.data.classes,
    )
    print(", ".join(f"{n} {name}" for name, n in counts.items()), "images in", args.directory or params.data.dir)
    return 0


@command("validate")
def _validate(args: argparse.Namespace, params: Params) -> int:
    from tasks.params import replace
    from tasks.validate import run_validate

    if args.directory:
        params = replace(params, data=replace(params.data, dir=args.directory))
    result = run_validate(params, args.reports, report=print)
    print(f"report: {Path(args.reports) / 'validation.json'}, page: {result['page']}")
    return 0


@command("train")
def _train(args: argparse.Namespace, params: Params) -> int:
    from tasks.train import run_train

    summary = run_train(params, args.model, args.reports)
    kept = summary["kept_epoch_metrics"]
    print(
        f"candidate: {args.model}  epoch {summary['kept_epoch']} of {summary['epochs']} kept: accuracy "
        f"{kept['accuracy']:.4f}, val_accuracy {kept['val_accuracy']:.4f}  ({summary['seconds']:.0f}s)"
    )
    return 0


@command("evaluate")
def _evaluate(args: argparse.Namespace, params: Params) -> int:
    from tasks.evaluate import run_evaluate

    result = run_evaluate(params, args.model, args.reports)
    validation, comparison = result["validation"], result["kept_epoch_vs_evaluate"]
    print(
        f"validation accuracy {validation['accuracy']:.4f}  escape {validation['escape_rate']:.4f}  "
        f"overkill {validation['overkill_rate']:.4f}  review {validation['review_rate']:.4f}  "
        f"threshold {validation['threshold']:.4f}  evaluate-vs-kept-epoch gap "
        f"{comparison['validation_accuracy_gap']:.4f}  -> {Path(args.reports) / 'evaluation.json'}"
    )
    _print_defect_types(validation)
    return 0


def _print_defect_types(metrics: dict) -> None:
    """The escape rate's 95 % upper bound, then one line per defect type (NG subfolder)."""
    from tasks.evaluate import defect_type_lines

    if "escape_rate_upper95" in metrics:
        print(f"escape rate 95 % upper bound {metrics['escape_rate_upper95']:.4f}")
    for line in defect_type_lines(metrics):
        print(f"  {line}")


@command("snapshot")
def _snapshot(args: argparse.Namespace, params: Params) -> int:
    from tasks.snapshot import commit_command, commit_message, commit_snapshot, snapshot_data

    result = snapshot_data(
        Path("."), params.data.dir, push=not args.no_push, stamp_dir=params.validate.cache_dir,
    )
    state = "new" if result["changed"] else "unchanged"
    pushed = "pushed to the DVC remote" if result["pushed"] else "not pushed (--no-push)"
    print(f"data snapshot {result['md5']} ({state}), {pushed}")
    if args.commit and commit_snapshot(Path("."), commit_message(result["md5"]), params.data.dir):
        print(f"committed {params.data.dir}.dvc")
    elif result["changed"]:
        print(f"record it in git: {commit_command(params.data.dir, result['md5'])}")
    return 0


@command("ingest")
def _ingest(args: argparse.Namespace, params: Params) -> int:
    from tasks.ingest import ACCEPTED, DUPLICATE, DUPLICATE_IN_BATCH, IGNORED, ingest_batch

    if args.flow:
        from flows.prefect_env import use_offline_defaults

        use_offline_defaults()
        from flows.ingest import ingest_batch_flow

        result = ingest_batch_flow(
            args.batch_dir, args.params, push=not args.no_push, commit=args.commit
        )
    else:
        result = ingest_batch(
            Path(args.batch_dir), params, Path("."), push=not args.no_push, commit=args.commit,
            report=log.info,
        )
        _announce_batch(params, result)
    fine = (ACCEPTED, DUPLICATE, DUPLICATE_IN_BATCH, IGNORED)
    for row in result["files"]:
        if row["verdict"] == ACCEPTED and not args.quiet:
            print(f"{ACCEPTED}: {printable(row['path'])} -> {row['stored_as']}")
        elif row["verdict"] not in fine or not args.quiet:
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
    # 2: something was rejected (the accepted files were still added); 1: nothing was done.
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


@command("gate")
def _gate(args: argparse.Namespace, params: Params) -> int:
    from tasks.gate import run_gate
    from tasks.registry import publish

    if args.no_publish:
        result = run_gate(params, args.model, args.reports, record=False, report_file=PREVIEW_REPORT)
        _print_decision(result)
        print(f"report: {Path(args.reports) / PREVIEW_REPORT} (nothing published or logged; "
              f"{Path(args.reports) / 'gate.json'}, the DVC metric, unchanged)")
        return 0
    result = run_gate(params, args.model, args.reports)
    _print_decision(result)
    if result["decision"] == "promote":
        card = publish(args.model, result, params, repo_dir=".")
        print(f"published {card['version']}: {Path(params.registry.dir) / 'champion.h5'}")
    return 0


@command("promote")
def _promote(args: argparse.Namespace, params: Params) -> int:
    from tasks.gate import run_gate
    from tasks.registry import publish

    result = run_gate(params, args.model, args.reports, record=False)
    _print_decision(result)
    card = publish(args.model, result, params, repo_dir=".", force_reason=args.reason)
    print(f"forced {card['version']} (reason: {args.reason}): {Path(params.registry.dir) / 'champion.h5'}")
    return 0


@command("champion")
def _champion(args: argparse.Namespace, params: Params) -> int:
    import json

    from tasks.registry import champion_card

    card = champion_card(params.registry.dir)
    if args.json:
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
    failed = "; ".join(r for r in reasons if r.endswith("FAIL")) if entry["action"] == "reject" else ""
    return failed or (reasons[-1] if reasons else "")


@command("history")
def _history(args: argparse.Namespace, params: Params) -> int:
    from tasks.registry import champion_at, parse_time, read_log

    if args.at:
        entry = champion_at(params.registry.dir, parse_time(args.at))
        print(f"champion at {args.at}: " + (
            f"{entry['version']} ({entry['action']} at {entry['time']})" if entry else "none"
        ))
        return 0
    print(f"{'time':26}{'action':9}{'version':8}{'previous':9}{'metric':20}{'escape':8}{'overkill':9}why")
    for entry in read_log(params.registry.dir):
        why = _history_why(entry)
        metric = f"{entry['metric']} {entry['value']:.4f}" if "metric" in entry else "-"
        rates = [f"{entry[k]:.4f}" if k in entry else "-" for k in ("escape_rate", "overkill_rate")]
        print(f"{entry['time']:26}{entry['action']:9}{entry.get('version') or '-':8}"
              f"{entry.get('previous') or '-':9}{metric:20}{rates[0]:8}{rates[1]:9}{why}")
    return 0


@command("rollback")
def _rollback(args: argparse.Namespace, params: Params) -> int:
    from tasks.registry import rollback

    card = rollback(params.registry, args.version, args.reason)
    print(f"champion is now {card['version']}: {Path(params.registry.dir) / 'champion.h5'}")
    return 0


_PRUNE_ROWS = (
    ("parameters", "parameters", "{:,.0f}"),
    ("file size (KB)", "file_bytes", "{:,.1f}"),
    ("predict images/s", "images_per_second", "{:,.0f}"),
    ("validation accuracy", "validation_accuracy", "{:.4f}"),
    ("escape rate", "escape_rate", "{:.4f}"),
    ("overkill rate", "overkill_rate", "{:.4f}"),
)


@command("prune")
def _prune(args: argparse.Namespace, params: Params) -> int:
    from tasks.prune import run_prune

    result = run_prune(params, args.model, args.out, args.reports, fraction=args.fraction, epochs=args.epochs)
    print("pruned " + ", ".join(f"{row['layer']} {row['filters_before']}->{row['filters_after']}"
                                for row in result["layers"])
          + f" filters; accuracy before fine-tuning {result['pruned_not_fine_tuned']['validation_accuracy']:.4f}, "
          f"fine-tuned {result['fine_tune_epochs']} epoch(s)")
    print(f"{'':22}{'before':>12}{'after':>12}{'change':>10}")
    for label, key, form in _PRUNE_ROWS:
        before, after = result["before"][key], result["after"][key]
        if key == "file_bytes":
            before, after = before / 1024, after / 1024
        change = f"{after / before - 1:+.0%}" if key in ("parameters", "file_bytes", "images_per_second") \
            else f"{after - before:+.4f}"
        print(f"{label:22}{form.format(before):>12}{form.format(after):>12}{change:>10}")
    print(f"candidate: {result['out']} (report {Path(args.reports) / 'prune.json'}); "
          f"check it against the champion with `fanaoi gate --model {result['out']}`")
    return 0


@command("predict")
def _predict(args: argparse.Namespace, params: Params) -> int:
    import json

    from tasks.predict import expand_paths, load_champion, predict_files

    files = expand_paths(args.paths, params.data.extensions)
    predictor = load_champion(params.registry.dir)
    results = predict_files(
        predictor, files, args.batch_size or params.registry.predict_batch_size, params.validate
    )
    if args.json:
        print(json.dumps({"champion": predictor.version, "threshold": predictor.threshold,
                          "positive_class": predictor.class_names[1], "results": results}, indent=2))
    else:
        positive = predictor.class_names[1]
        for row in results:
            outcome = f"error: {row['error']}" if row["error"] else (
                f"{row['label']}  p({positive})={row['probability']:.4f}"
            )
            print(f"{printable(row['path'])}  {printable(outcome)}")
    # 1 when some file could not be classified; the others were still printed.
    return 1 if any(row["error"] for row in results) else 0


@command("export")
def _export(args: argparse.Namespace, params: Params) -> int:
    from tasks.export import export_version

    entry = export_version(params, args.format, args.version)
    print(f"exported {args.version or 'the champion'} as {args.format}: {entry['path']} "
          f"({entry['bytes'] / 1e6:.2f} MB); max abs difference from Keras {entry['max_abs_diff']:.2g} "
          f"on {entry['checked_images']} validation images ({entry['runtime']})")
    return 0


@command("serve-model")
def _serve_model(args: argparse.Namespace, params: Params) -> int:
    from tasks.serve import run_server

    host = args.host or params.serve.host
    port = args.port if args.port is not None else params.serve.port
    print(f"serving the champion of {params.registry.dir} on http://{host}:{port} "
          f"(POST /predict, GET /health, GET /model, docs at /docs, "
          f"{params.serve.reports_dir}/ at /reports/)")
    run_server(params, host, port)
    return 0


@command("explain")
def _explain(args: argparse.Namespace, params: Params) -> int:
    from tasks.explain import run_explain

    summary = run_explain(
        params, version=args.version, model_path=args.model, image_path=args.image,
        out_dir=args.out, reports_dir=args.reports, report=log.debug,
    )
    shown = len(summary["heatmaps"])
    print(f"{summary['model']}: {len(summary['escapes'])} escape(s), {len(summary['overkills'])} "
          f"overkill(s) on {summary['validation']['count']} validation images; {shown} heatmap(s)"
          + (f", {summary['left_out']} left out (explain.max_heatmaps)" if summary["left_out"] else ""))
    _print_defect_types(summary["validation"])
    print(f"report: {summary['index']}  ({summary['seconds']:.1f}s)")
    return 0


@command("plots-template")
def _plots_template(args: argparse.Namespace, params: Params) -> int:
    from tasks.plots import configured_plots_template, write_plots_template

    dvc_dir = Path(args.params).resolve().parent / ".dvc"
    template = write_plots_template(configured_plots_template(dvc_dir))
    print(f"wrote {template}: `dvc plots show` and `dvc plots diff` now draw without network")
    return 0


@command("retrain")
def _retrain(args: argparse.Namespace, params: Params) -> int:
    from flows.prefect_env import use_offline_defaults

    project = Path(args.params).resolve().parent
    data_dir = project / params.data.dir
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        from tasks.demo_data import generate_demo_dataset

        demo = params.demo
        print(f"{data_dir} is empty: drawing the demo data set ({demo.count} images, seed {demo.seed})")
        generate_demo_dataset(data_dir, count=demo.count, seed=demo.seed, size=demo.size,
                              ng_fraction=demo.ng_fraction, classes=params.data.classes)
    use_offline_defaults()
    from flows.nightly import nightly_retrain

    state = nightly_retrain(params_path=str(Path(args.params).resolve()), push=not args.no_push,
                            return_state=True)
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
def _serve(args: argparse.Namespace, params: Params) -> int:
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
    deployment = nightly_deployment(params, Path(args.params))
    print(f"serving nightly-retrain/{deployment.name} on cron {params.nightly.cron!r}; "
          f"run it now with `prefect deployment run nightly-retrain/{deployment.name}`")
    serve(deployment)
    return 0


@command("status")
def _status(args: argparse.Namespace, params: Params) -> int:
    import json

    from flows.status import configured_api_url, nightly_runs
    from tasks.status import now_utc, project_status

    project = Path(args.params).resolve().parent
    now = now_utc()
    state = project_status(project, params.data.dir, project / params.registry.dir, now)
    state["prefect"] = nightly_runs(configured_api_url(), params.status.api_timeout, now)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    for label, text in _status_lines(state):
        print(f"{label:12}{text}")
    return 0


def _status_lines(state: dict) -> list[tuple[str, str]]:
    """One screen: champion, last and next nightly run, data, agreement."""
    champion, prefect, data = state["champion"], state["prefect"], state["data"]
    lines = [("champion", _champion_line(champion))]
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
    if pending is None:
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
def _alerts(args: argparse.Namespace, params: Params) -> int:
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


DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


@command("server")
def _server(args: argparse.Namespace, params: Params) -> int:
    """`prefect server start` on PostgreSQL; the process becomes the server (signals reach it)."""
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
    os.execv(prefect, [prefect, "server", "start", "--host", server.host, "--port", str(server.port)])


def _require_prefect_server(what: str) -> None:
    """Automations and schedules live on a server; Prefect's temporary local API forgets them."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise FanaoiError(
            f"no Prefect server for {what}: start one (`prefect server start` or `fanaoi server`) "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)"
        )


def _add_prune_parser(sub: argparse._SubParsersAction) -> None:
    prune = sub.add_parser(
        "prune", help="remove the weakest Conv2D filters (L1 norm), fine-tune, compare before/after"
    )
    prune.add_argument("--fraction", type=float, help="share of each Conv2D's filters removed "
                       "(default: prune.fraction)")
    prune.add_argument("--model", default="models/candidate.h5", help="model to prune (default: %(default)s)")
    prune.add_argument("--out", default="models/candidate.h5", help="pruned candidate (default: %(default)s)")
    prune.add_argument("--epochs", type=int, help="fine-tune epochs (default: prune.fine_tune_epochs)")
    prune.add_argument("--reports", default="reports", help="folder for prune.json")


def _add_champion_parsers(sub: argparse._SubParsersAction) -> None:
    """Commands that use a published model: predict, export, serve-model."""
    predict = sub.add_parser("predict", help="classify images with the champion")
    predict.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("--json", action="store_true", help="results as JSON")
    predict.add_argument("--batch-size", type=int, help="default: registry.predict_batch_size")
    export = sub.add_parser("export", help="convert a registry version to TFLite, ONNX or SavedModel (checked)")
    export.add_argument("--format", required=True, choices=["tflite", "onnx", "savedmodel"])
    export.add_argument("version", nargs="?", help="e.g. v0003 or 3 (default: the champion)")
    serve_model = sub.add_parser("serve-model", help="serve the champion over HTTP (reloads a new one)")
    serve_model.add_argument("--host", help="default: serve.host")
    serve_model.add_argument("--port", type=int, help="default: serve.port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanaoi",
        description="FanAOI: retrain, check and publish the GO/NG fan inspection model.",
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="draw a synthetic GO/NG fan image data set")
    demo.add_argument("directory", nargs="?", help="output folder (default: data.dir)")
    demo.add_argument("--count", type=int, help="number of images (default: demo.count)")
    demo.add_argument("--seed", type=int, help="random seed (default: demo.seed)")

    check = sub.add_parser(
        "validate", help="check every file of the data set (Great Expectations); exit 1 if blocked"
    )
    check.add_argument("directory", nargs="?", help="data folder (default: data.dir)")
    check.add_argument("--reports", default="reports", help="reports folder")

    for name, text in (
        ("train", "train a candidate model on the train split"),
        ("evaluate", "score the candidate; compare evaluate() with the kept epoch"),
    ):
        stage = sub.add_parser(name, help=text)
        stage.add_argument("--model", default="models/candidate.h5", help="candidate path")
        stage.add_argument("--reports", default="reports", help="reports folder")

    snapshot = sub.add_parser("snapshot", help="dvc add + dvc push the data folder")
    snapshot.add_argument("--no-push", action="store_true", help="record it locally only")
    snapshot.add_argument("--commit", action="store_true", help="git commit data.dvc")

    ingest = sub.add_parser(
        "ingest", help="add a labeled batch (GO/, NG/ folders) to the data set, a verdict per file"
    )
    ingest.add_argument("batch_dir", help="batch folder laid out like the data set")
    ingest.add_argument("--no-push", action="store_true", help="snapshot locally, skip dvc push")
    ingest.add_argument("--commit", action="store_true", help="git commit data.dvc afterwards")
    ingest.add_argument(
        "--flow", action="store_true", help="run as the Prefect flow ingest-batch (dashboard)"
    )
    ingest.add_argument(
        "-q", "--quiet", action="store_true", help="print only the files that need attention"
    )

    gate = sub.add_parser("gate", help="candidate vs champion: promote (and publish) or reject")
    gate.add_argument(
        "--no-publish", action="store_true",
        help=f"decide only: publish and log nothing; the report goes to REPORTS/{PREVIEW_REPORT}, "
             f"not to gate.json (a DVC metric)",
    )
    promote = sub.add_parser("promote", help="publish the candidate whatever the gate says (logged)")
    promote.add_argument("--force", action="store_true", required=True, help="required: override the gate")
    promote.add_argument("--reason", required=True, help="why; goes to the card and the log")
    for stage in (gate, promote):
        stage.add_argument("--model", default="models/candidate.h5", help="candidate path")
        stage.add_argument("--reports", default="reports", help="reports folder")

    show = sub.add_parser("champion", help="show the champion's model card")
    show.add_argument("--json", action="store_true", help="the whole card as JSON")
    history = sub.add_parser("history", help="every gate decision, promotion and rollback")
    history.add_argument("--at", metavar="TIME", help="which version was champion at TIME (ISO 8601)")
    back = sub.add_parser("rollback", help="make an earlier published version the champion again")
    back.add_argument("version", help="e.g. v0003 or 3 (see `fanaoi history`)")
    back.add_argument("--reason", help="why; goes to the log")
    _add_prune_parser(sub)
    _add_champion_parsers(sub)

    explain = sub.add_parser(
        "explain", help="HTML report: filters, feature maps, Grad-CAM on the validation mistakes"
    )
    explain.add_argument("version", nargs="?", help="registry version, e.g. v0003 (default: the champion)")
    explain.add_argument("--model", metavar="PATH", help="a .h5 file instead, e.g. models/candidate.h5")
    explain.add_argument("--image", metavar="PATH", help="image for the feature maps (default: first validation image)")
    explain.add_argument("--out", metavar="DIR", help="default: REPORTS/explain/<version or file name>")
    explain.add_argument("--reports", default="reports", help="reports folder (history.csv of --model)")
    sub.add_parser(
        "plots-template", help="write the offline page template of `dvc plots show` (.dvc/config: plots.html_template)"
    )

    retrain = sub.add_parser(
        "retrain", help="run the nightly flow once (demo data first if data/ is empty)"
    )
    retrain.add_argument("--no-push", action="store_true", help="snapshot locally, skip dvc push")
    _add_operations_parsers(sub)
    return parser


def _add_operations_parsers(sub: argparse._SubParsersAction) -> None:
    """Commands of the operator: the deployment, alerts, the line's state."""
    sub.add_parser("serve", help="serve the nightly deployment on its cron and on ingests (params: nightly)")
    status = sub.add_parser(
        "status", help="champion, last and next nightly run, new data, and whether they agree"
    )
    status.add_argument("--json", action="store_true", help="the same as JSON")
    sub.add_parser(
        "alerts", help="install the alert automations on the Prefect server (params: alerts)"
    )
    sub.add_parser(
        "server", help=f"start the Prefect server on PostgreSQL ({DATABASE_ENV}; params: server)"
    )


# Commands that read or change data/, its snapshot, the stage outputs or the registry hold
# the project lock (tasks.project_lock) while they run. `retrain` and `ingest --flow` run
# a flow, which takes it itself.
LOCKED_COMMANDS = frozenset({
    "demo-data", "validate", "train", "evaluate", "snapshot", "ingest", "gate", "promote",
    "rollback", "export",
})


def _project_lock(
    args: argparse.Namespace, params: Params, argv: Sequence[str] | None
) -> contextlib.AbstractContextManager[None]:
    """The project lock for a command that needs it; the project is the params file's folder."""
    if args.command not in LOCKED_COMMANDS or getattr(args, "flow", False):
        return contextlib.nullcontext()
    from tasks.project_lock import project_lock

    command = printable(" ".join(["fanaoi", *(sys.argv[1:] if argv is None else argv)]))
    return project_lock(Path(args.params).resolve().parent, command, params.lock.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Prefect's client logs every API request at INFO, DVC every dvc.lock update (twice,
    # through its own handler too): noise between the epoch lines.
    for chatty in ("httpx", "dvc"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        params = load_params(args.params)
        with _project_lock(args, params, argv):
            return COMMANDS[args.command](args, params)
    except EXPECTED_ERRORS as exc:
        print(f"fanaoi {args.command}: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fanaoi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
