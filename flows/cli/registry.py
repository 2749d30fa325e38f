"""Commands on the registry: the gate, forced promotions, the champion, its history, rollbacks, exports."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from flows.cli import AsJson, Model, Reports, Version, command
from flows.cli.formatting import history_why, print_decision
from tasks.errors import printable
from tasks.params import Params

# What `fanaoi gate --no-publish` writes instead of gate.json, the gate stage's DVC metric.
PREVIEW_REPORT = "gate-preview.json"


def judge(params: Params, model: Path | None, reports: Path | None, **options: Any) -> tuple[Path, Path, dict]:
    """The gate's decision on ``model`` (default: the candidate), printed; returns the model, the
    reports folder and the decision. A ``--model`` evaluate has not scored is scored first."""
    from tasks.registry.gate import run_gate

    if model is not None:
        score_unless_evaluated(params, model, Path(reports or params.paths.reports))
    model, reports = params.paths.chosen(model, reports)
    result = run_gate(params, model, reports, **options)
    print_decision(result)
    return model, reports, result


def score_unless_evaluated(params: Params, model: Path, reports: Path) -> None:
    """The gate decides on evaluate's scores. A model evaluate has not scored into ``reports``
    (``--model`` of a pruned or hand-made file) is scored here first, by the same function and
    on the manifest validate wrote (in ``reports``, else in paths.reports)."""
    from tasks.data.image_manifest import read_images
    from tasks.inference.scores import score_candidate, scored_by_evaluate

    if scored_by_evaluate(reports, model):
        return
    print(f"{model}: not scored by `fanaoi evaluate` in {reports}; scoring its validation and test images first",
          file=sys.stderr)
    score_candidate(model, read_images(reports, params.data, params.paths.reports), reports, params.evaluate,
                    params.gate.target_escape_rate)


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
    from tasks.registry.publish import publish

    if no_publish:
        _, reports, _ = judge(params, model, reports, record=False, report_file=PREVIEW_REPORT)
        print(f"report: {reports / PREVIEW_REPORT} (nothing published or logged; "
              f"{reports / 'gate.json'}, the DVC metric, unchanged)")
        return 0
    model, reports, result = judge(params, model, reports)
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
    from tasks.registry.publish import publish

    model, reports, result = judge(params, model, reports, record=False)
    if not force and not typer.confirm(f"publish {model} over this decision?", err=True):
        print("not published")
        return 1
    card = publish(model, result, params, repo_dir=".", force_reason=reason)
    print(f"forced {card['version']} (reason: {card['reason']}): {Path(params.registry.dir) / 'champion.h5'}")
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
        print(printable(f"  {key + ':':15}{value}"))  # a card may be older than escaped reasons
    return 0


@command("history")
def _history(
    params: Params,
    at: Annotated[str | None, typer.Option(metavar="TIME", help="ISO 8601, e.g. 2026-11-20T03:00")] = None,
) -> int:
    """Every gate decision, promotion and rollback; --at: which version was champion at TIME."""
    from tasks.registry.decisions import champion_at, parse_time, read_log, unlogged_versions

    if at:
        entry = champion_at(params.registry.dir, parse_time(at))
        found = f"{entry['version']} ({entry['action']} at {entry['time']})" if entry else "none"
        print(printable(f"champion at {at}: {found}"))
        return 0
    print(f"{'time':26}{'action':9}{'version':8}{'previous':9}{'metric':20}{'escape':8}{'overkill':9}why")
    entries = read_log(params.registry.dir)
    for entry in entries:
        why = history_why(entry)
        metric = f"{entry['metric']} {entry['value']:.4f}" if entry.get("value") is not None else "-"
        rates = [f"{entry[k]:.4f}" if k in entry else "-" for k in ("escape_rate", "overkill_rate")]
        # One line per entry, even from a log written before reasons were escaped, or edited by hand.
        print(printable(f"{entry['time']:26}{entry['action']:9}{entry.get('version') or '-':8}"
                        f"{entry.get('previous') or '-':9}{metric:20}{rates[0]:8}{rates[1]:9}{why}"))
    for version, pending in unlogged_versions(params.registry.dir, entries).items():
        folder = Path(params.registry.dir) / "versions" / version
        why = ("a publish killed before its log line; the next command that changes the registry finishes it"
               if pending else "published by a run killed before its log line, or the line was removed")
        print(printable(f"{'-':26}{'unlogged':9}{version:8}{'-':9}{'-':20}{'-':8}{'-':9}"
                        f"no line in log.jsonl for {folder}: {why}"))
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


@command("export", locked=True)
def _export(
    params: Params,
    target: Annotated[Literal["tflite", "onnx", "savedmodel"], typer.Option("--format")],
    version: Version = None,
) -> int:
    """Convert a registry version to TFLite, ONNX or SavedModel (checked against Keras)."""
    from tasks.registry.export import export_version

    entry = export_version(params, target, version)
    print(f"exported {version or 'the champion'} as {target}: {entry['path']} "
          f"({entry['bytes'] / 1e6:.2f} MB); max abs difference from Keras {entry['max_abs_diff']:.2g} "
          f"on {entry['checked_images']} validation images ({entry['runtime']})")
    return 0
