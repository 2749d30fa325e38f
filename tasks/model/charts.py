"""Small line charts for the explain page: the geometry here, the SVG in templates/explain.html.j2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.model.history import read_history

SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
WIDTH, HEIGHT = 420, 280
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 42


def _ticks(low: float, high: float, whole: bool = False, count: int = 5) -> list[float]:
    """Evenly spaced tick values; whole numbers only (epochs) when ``whole``."""
    if whole:
        step = max(1, math.ceil((high - low) / 10))
        return list(range(math.ceil(low), math.floor(high) + 1, step))
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    *,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    diagonal: bool = False,
) -> dict[str, Any]:
    """Where everything of a chart goes: ``series`` are (name, xs, ys); ranges default to the data's."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    x0, x1 = x_range or (min(xs), max(xs))
    y0, y1 = y_range or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    return {
        "title": title, "x_label": x_label, "y_label": y_label,
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "top": TOP, "plot_w": plot_w, "plot_h": plot_h,
        "x_ticks": [(px(x), x) for x in _ticks(x0, x1, whole=all(float(x).is_integer() for x in xs))],
        "y_ticks": [(py(y), y) for y in _ticks(y0, y1)],
        "diagonal": (px(x0), py(y0), px(x1), py(y1)) if diagonal else None,
        "series": [
            {
                "name": name, "colour": SERIES_COLOURS[index % len(SERIES_COLOURS)],
                "points": " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy, strict=True)),
                # Right middle: rising curves (accuracy, ROC) end high there, falling ones (loss) low.
                "legend": (LEFT + plot_w - 110, TOP + plot_h / 2 + 14 * index),
            }
            for index, (name, sx, sy) in enumerate(series)
        ],
    }


def history_columns(path: Path) -> dict[str, list[float]]:
    """history.csv as columns of floats."""
    rows = read_history(path)
    return {column: [row[column] for row in rows] for column in rows[0]} if rows else {}


def history_charts(history: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Accuracy and loss per epoch, train beside validation, for the columns history.csv has."""
    epochs = history.get("epoch", [])
    charts = []
    for measure in ("accuracy", "loss"):
        series = [
            (name, epochs, history[column])
            for name, column in (("train", measure), ("validation", f"val_{measure}"))
            if column in history
        ]
        if series and epochs:
            charts.append(line_chart(f"{measure.capitalize()} per epoch", series, "epoch", measure))
    return charts
