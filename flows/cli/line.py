"""Commands that run the line: predicting, the model service, the nightly retrain and its Prefect server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli import AsJson, NoPush, command, params_file
from flows.cli.data import draw_demo_data
from flows.cli.formatting import print_defect_types, status_lines
from flows.names import NIGHTLY_FLOW
from tasks.errors import FanaoiError, printable
from tasks.params import Params

DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


@command("predict")
def _predict(
    params: Params,
    paths: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_DIR...", help="image files or folders")],
    as_json: AsJson = False,
    batch_size: Annotated[int | None, typer.Option(help="default: evaluate.batch_size")] = None,
) -> int:
    """Classify images with the champion; exit 1 when some file could not be classified."""
    import json

    from tasks.inference.predictor import expand_paths, predict_files
    from tasks.params import replace
    from tasks.registry.champion import load_champion

    # Bounded like the params value it stands in for.
    evaluate = params.evaluate if batch_size is None else replace(params.evaluate, batch_size=batch_size)
    files = expand_paths([str(path) for path in paths], params.data.extensions)
    predictor = load_champion(params.registry.dir)
    results = predict_files(predictor, files, evaluate.batch_size, params.validate)
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


@command("serve-model")
def _serve_model(
    params: Params,
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="default: serve.host")] = None,
    port: Annotated[int | None, typer.Option(help="default: serve.port")] = None,
) -> int:
    """Serve the champion over HTTP (reloads a new one)."""
    from flows.serve_model import run_server

    host = host or params.serve.host
    port = params.serve.port if port is None else port
    print(f"serving the champion of {params.registry.dir} on http://{host}:{port} "
          f"(home page at /, POST /predict, GET /health, GET /model, docs at /docs, "
          f"{params.serve.reports_dir}/ at /reports/)")
    run_server(params, params_file(ctx).resolve().parent, host, port)
    return 0


@command("retrain")
def _retrain(params: Params, ctx: typer.Context, no_push: NoPush = False) -> int:
    """Run the nightly flow once (demo data first if data/ is empty)."""
    from flows.params import project_params_file
    from flows.prefect_env import use_offline_defaults
    from tasks.nightly_report import unchanged_why

    params_path = project_params_file(params_file(ctx))  # another file: refused before a run starts, fails, alerts
    data_dir = params_path.parent / params.data.dir
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        demo = params.demo
        print(f"{data_dir} is empty: drawing the demo data set ({demo.count} images, seed {demo.seed})")
        draw_demo_data(params, data_dir)
    use_offline_defaults()
    from flows.nightly import nightly_retrain

    state = nightly_retrain(params_path=str(params_path), push=not no_push, return_state=True)
    if state.is_cancelled():
        print(f"fanaoi retrain: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()  # a failed run raises its own error here
    unchanged = summary["decision"] == "unchanged"
    print(f"decision: {summary['decision'].upper()}" + (f" ({unchanged_why(summary['stages'])})" if unchanged else ""))
    if unchanged and summary["last_decision"]:
        print(f"last gate decision: {summary['last_decision']}, because:")
    for reason in summary["reasons"]:
        print(f"  - {reason}")
    validation = summary["validation"]
    if validation:
        print(f"candidate on {validation['count']} validation images: accuracy {validation['accuracy']:.4f}, "
              f"escape rate {validation['escape_rate']:.4f}, overkill rate {validation['overkill_rate']:.4f}, "
              f"review rate {validation.get('review_rate', 0.0):.4f}")
        print_defect_types(validation)
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

    from flows.deployment_route import nightly_deployment, replace_pool_deployment

    # Prefect's temporary local API has no scheduler: served there, the cron never fires.
    _require_prefect_server("scheduling the nightly runs")

    from flows.alerts import alerts_configured, install_alerts

    if alerts_configured(params.alerts):
        print(f"alerts: {', '.join(install_alerts(params.alerts))}")
    else:
        print("alerts: none (set alerts.webhook_url or alerts.block to be told when a night fails)")
    deployment = nightly_deployment(params, params_file(ctx))
    full_name = f"{NIGHTLY_FLOW}/{deployment.name}"
    if pool := replace_pool_deployment(full_name):
        print(f"replaced {full_name} of work pool {pool!r} (from `prefect deploy`) and its trigger: "
              f"this process runs it now; `prefect deploy --all` hands it back to the pool")
    print(f"serving {full_name} on cron {params.nightly.cron!r}; "
          f"run it now with `prefect deployment run {full_name}`")
    serve(deployment)
    return 0


@command("status")
def _status(params: Params, ctx: typer.Context, as_json: AsJson = False) -> int:
    """Champion, last and next nightly run, new data, and whether they agree."""
    import json

    from flows.project_status import now_utc, project_status
    from flows.status import configured_api_url, nightly_runs

    project = params_file(ctx).resolve().parent
    now = now_utc()
    state = project_status(project, params.data.dir, project / params.registry.dir, now, params.validate.cache_dir)
    state["prefect"] = nightly_runs(configured_api_url(), params.status.api_timeout, now)
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    for label, text in status_lines(state):
        print(f"{label:12}{text}")
    return 0


@command("alerts")
def _alerts(params: Params) -> int:
    """Install the alert automations on the Prefect server (params: alerts)."""
    from flows.alerts import alert_target, install_alerts
    from flows.prefect_env import use_offline_defaults

    target = alert_target(params.alerts)  # a missing or unusable receiver is refused before Prefect is touched
    use_offline_defaults()
    _require_prefect_server("the alert automations")
    names = install_alerts(params.alerts)
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
    # The alert bodies the server renders link the run's dashboard page only when it knows its UI's URL.
    os.environ.setdefault("PREFECT_UI_URL", f"http://{host}:{server.port}")
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
