"""The manifest file: validate's table of the usable images, which every later stage reads.

One row per image that validation found readable in a class folder: where it is, its
class and label, its content hash and split, its defect type, size, mode and the
statistics validation computed. Train, evaluate, the gate, explain, prune and export read
this file instead of walking ``data/`` and hashing every image again (about a minute at
100,000 images), and all of them see the same images in the same order.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tasks.data.dataset import LabeledImage, select
from tasks.durable import atomic_write
from tasks.errors import FanaoiError
from tasks.params import DataParams

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_FILE = "manifest.csv"
COLUMNS = ("path", "class_name", "label", "sha256", "split", "defect_type", "width", "height", "mode",
           "channels", "bytes", "brightness", "brightness_z", "dhash")
_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3,
             "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "CMYK": 4}


class ManifestError(FanaoiError):
    """The manifest file is missing or does not fit the data; the message says how to remake it."""


def manifest_path(reports_dir: Path | str) -> Path:
    return Path(reports_dir) / MANIFEST_FILE


def write_image_manifest(usable: pd.DataFrame, data: DataParams, path: Path) -> int:
    """Write the rows of ``usable`` (validate's readable images) to ``path``; returns the row count."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    mapping = data.class_mapping
    for row in usable.sort_values("path").itertuples(index=False):
        writer.writerow([
            row.path, row.class_name, mapping[row.class_name], row.sha256, row.split,
            _text(row.defect_type), _number(row.width), _number(row.height), _text(row.mode),
            _CHANNELS.get(row.mode, ""), _number(row.bytes), _text(row.brightness),
            _text(row.brightness_z), _text(row.dhash),
        ])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode("utf-8")))
    return len(usable)


def _text(value: object) -> str:
    import pandas as pd

    return "" if pd.isna(value) else str(value)


def _number(value: object) -> str:
    return _text(value if _text(value) == "" else int(value))


def read_images(
    reports_dir: Path | str, data: DataParams, project_reports: Path | str | None = None,
) -> list[LabeledImage]:
    """The images of the manifest in ``reports_dir``, under ``data.dir``, in training order.

    A command pointed at a reports folder of its own (``--reports``) that holds no manifest
    reads the project's, in ``project_reports`` (paths.reports, where validate writes it).
    Training order is the order of data.classes, then the path's parts (as a folder scan
    sorts them), so a run reads the images in the same order whichever way they were listed.
    """
    path = manifest_path(reports_dir)
    if project_reports is not None and not path.is_file():
        path = manifest_path(project_reports)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; run `fanaoi validate` (or `dvc repro validate`) first"
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc}); remake it with `fanaoi validate`") from None
    order = {name: index for index, name in enumerate(data.classes)}
    data_dir, mapping = Path(data.dir), data.class_mapping
    images = []
    for number, row in enumerate(rows, start=2):
        try:
            if mapping[row["class_name"]] != int(row["label"]):
                raise KeyError(row["class_name"])
            images.append(LabeledImage(
                data_dir / row["path"], row["class_name"], int(row["label"]), row["sha256"], row["split"],
                row["defect_type"] or None, row["mode"] or None,
            ))
        except (KeyError, TypeError, ValueError):
            raise ManifestError(
                f"{path}: line {number} does not fit data.classes {list(data.classes)} of params.yaml; "
                f"remake the manifest with `fanaoi validate`"
            ) from None
    images.sort(key=lambda image: (order[image.class_name], PurePosixPath(image.path).parts))
    return images


def read_split(
    reports_dir: Path | str, data: DataParams, split: str, project_reports: Path | str | None = None,
) -> list[LabeledImage]:
    return select(read_images(reports_dir, data, project_reports), split)


def images_digest(images: Iterable[LabeledImage]) -> str:
    """A digest of which images these are (path, content, label): a key for scores of them."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.path}\0{image.sha256}\0{image.label}\n".encode())
    return digest.hexdigest()
