"""Which model ``fanaoi explain`` draws: a registry version (default: the champion) or a file.

The registry resolves it (its card's threshold, its training history) and hands the
explain page a ``ModelSource``: the model package never reads the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.inference.model_file import ModelFileError
from tasks.model.explain import ExplainError, ModelSource, run_explain
from tasks.params import Params
from tasks.registry.champion import published_version, read_embedded_card
from tasks.registry.store import HISTORY_FILE


def resolve_source(
    params: Params, version: str | None, model_path: str | Path | None, reports_dir: Path | str
) -> ModelSource:
    """A registry version (default: the champion's) or a model file, with its threshold."""
    if version is not None and model_path is not None:
        raise ExplainError("give a VERSION or --model PATH, not both")
    if model_path is not None:
        return _file_source(Path(model_path), params, Path(reports_dir) / "history.csv")
    registry = Path(params.registry.dir)
    name, folder = published_version(registry, version, error=ExplainError, hint="(or pass --model PATH)")
    card = read_embedded_card(folder / "model.h5")
    history = folder / HISTORY_FILE
    return ModelSource(
        name=name, path=folder / "model.h5", threshold=float(card["threshold"]),
        threshold_origin=f"the model card of {name}",
        history=history if history.is_file() else None,
        history_note=f"from {history}" if history.is_file() else (
            f"{folder} holds no training history (it was published without one); "
            f"the curves of the latest training run are in reports/history.csv"
        ),
    )



def _file_source(path: Path, params: Params, history: Path) -> ModelSource:
    try:
        card = read_embedded_card(path)
        threshold, origin = float(card["threshold"]), f"the model card inside {path}"
    except ModelFileError:
        # A candidate has no card yet: it would be gated at the evaluate threshold.
        threshold, origin = params.evaluate.threshold, "evaluate.threshold in params.yaml"
    return ModelSource(
        name=path.stem, path=path, threshold=threshold, threshold_origin=origin,
        history=history if history.is_file() else None,
        history_note=f"from {history}" if history.is_file() else f"{history} not found",
    )


def explain_model(
    params: Params,
    *,
    version: str | None = None,
    model_path: str | Path | None = None,
    reports_dir: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``fanaoi explain``: resolve the model (``resolve_source``), then draw its page (``run_explain``)."""
    reports_dir = Path(reports_dir or params.paths.reports)
    return run_explain(params, resolve_source(params, version, model_path, reports_dir), reports_dir=reports_dir,
                       **options)
