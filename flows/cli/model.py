"""Commands on a model: training, evaluating, pruning and explaining it, the DVC plots page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli import Model, Reports, Version, command, log, params_file
from flows.cli.formatting import PRUNE_RATES, PRUNE_SIZES, print_defect_types
from tasks.params import Params


@command("train", locked=True)
def _train(params: Params, model: Model = None, reports: Reports = None) -> int:
    """Train a candidate model on the train split."""
    from tasks.model.train import run_train
    from tasks.registry.warm_start import champion_warm_start

    model, reports = params.paths.chosen(model, reports)
    summary = run_train(params, model, reports, warm_start=champion_warm_start(params))
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
    print_defect_types(validation)
    return 0


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
    for label, key, divisor, form in PRUNE_SIZES:
        before, after = result["before"][key] / divisor, result["after"][key] / divisor
        print(f"{label:22}{before:>12{form}}{after:>12{form}}{after / before - 1:>+10.0%}")
    for label in PRUNE_RATES:
        before, after = (result[when][label.replace(" ", "_")] for when in ("before", "after"))
        print(f"{label:22}{before:>12.4f}{after:>12.4f}{after - before:>+10.4f}")
    print(f"candidate: {result['out']} (report {reports / 'prune.json'}); "
          f"check it against the champion with `fanaoi gate --model {result['out']}`")
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
    from tasks.registry.explain_source import explain_model

    summary = explain_model(
        params, version=version, model_path=model, image_path=image, out_dir=out, reports_dir=reports,
        report=log.debug,
    )
    shown = len(summary["heatmaps"])
    print(f"{summary['model']}: {len(summary['escapes'])} escape(s), {len(summary['overkills'])} "
          f"overkill(s) on {summary['validation']['count']} validation images; {shown} heatmap(s)"
          + (f", {summary['left_out']} left out (explain.max_heatmaps)" if summary["left_out"] else ""))
    print_defect_types(summary["validation"])
    print(f"report: {summary['index']}  ({summary['seconds']:.1f}s)")
    return 0


@command("plots-template")
def _plots_template(params: Params, ctx: typer.Context) -> int:
    """Write the offline page template of `dvc plots show` (.dvc/config: plots.html_template)."""
    from tasks.model.plots import configured_plots_template, write_plots_template

    template = write_plots_template(configured_plots_template(params_file(ctx).resolve().parent / ".dvc"))
    print(f"wrote {template}: `dvc plots show` and `dvc plots diff` now draw without network")
    return 0
