"""history.csv: one row of metrics per epoch, and the epoch whose weights training keeps."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

# No wall time here: history.csv is a DVC out and plot, and the same data and params must
# write the same bytes whichever driver ran (the flow or `dvc repro`). Epoch times go to
# the log and the run's total to train.json.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def kept_epoch(history: Sequence[dict[str, float]], tolerance: float = 0.0) -> dict[str, float]:
    """The epoch whose weights training keeps: the latest whose validation loss is within
    ``tolerance`` of the lowest (0: the lowest itself, the latest on ties).

    The validation loss of a few hundred images is flat and noisy late in training: the
    lowest is often an earlier epoch by a margin no larger than that noise, while the later
    epochs, trained on with a smaller learning rate, score as well or better on new images.
    """
    lowest = min(row["val_loss"] for row in history)
    return max((row for row in history if row["val_loss"] <= lowest + tolerance), key=lambda row: row["epoch"])


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv back as one row of floats per epoch."""
    with path.open(encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def write_history(history: Sequence[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6f}" if k != "epoch" else row[k]) for k in HISTORY_COLUMNS if k in row})
