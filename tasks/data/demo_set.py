"""Write a demo data set: many images of tasks.data.demo_data into data/GO and data/NG, on every core.

The folder is filled whole or not at all: images are drawn into a staging folder beside it
and moved in at the end.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tasks.data.demo_data import DemoDataError, draw_demo_image

log = logging.getLogger(__name__)

_JOBS_PER_WORKER = 400  # below this, starting a worker costs more than it saves
MIN_SIZE = 32  # smaller fans lose their blades


def generate_demo_dataset(  # noqa: PLR0917 - the signature callers code against
    out_dir: Path,
    count: int,
    seed: int,
    size: int,
    ng_fraction: float,
    classes: Sequence[str] = ("GO", "NG"),
) -> dict[str, int]:
    """Write ``count`` fan images to out_dir/<class>/, round(count * ng_fraction) of them NG.

    Refuses to touch a class folder that already holds files. Images are drawn into a
    temporary folder beside ``out_dir`` and moved in at the end, so an interrupted run
    leaves a ``.demo-data-partial-*`` folder and no half-filled class folder.
    """
    out_dir = Path(out_dir)
    _check_arguments(count, size, ng_fraction, classes)
    _refuse_filled_folders(out_dir, classes)
    ng_count = round(count * ng_fraction)
    counts = {classes[0]: count - ng_count, classes[1]: ng_count}
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-data-partial-", dir=out_dir.parent))
    try:
        jobs = [
            (seed, label, index, size, staging / name)
            for label, name in enumerate(classes)
            for index in range(counts[name])
        ]
        for name in classes:
            (staging / name).mkdir()
        _run_all(jobs)
        for name in classes:
            _move_in(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("demo data: %s in %s (seed %d)", counts, out_dir, seed)
    return counts


def _run_all(jobs: list[tuple[int, int, int, int, Path]]) -> None:
    """Draw on all cores for large sets; small ones are done before a worker would start.

    Workers are spawned, not forked: the caller may hold TensorFlow or Prefect threads.
    """
    workers = min(os.cpu_count() or 1, math.ceil(len(jobs) / _JOBS_PER_WORKER))
    if workers <= 1:
        for job in jobs:
            _write_demo_image(job)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_write_demo_image, jobs, chunksize=64))


def _write_demo_image(job: tuple[int, int, int, int, Path]) -> None:
    seed, label, index, size, folder = job
    image, kind = draw_demo_image(seed, label, index, size)
    name = f"{folder.name.lower()}_{index:05d}" + (f"_{kind}" if kind else "")
    image.save(folder / f"{name}.png", format="PNG", optimize=False, compress_level=6)


def _check_arguments(count: int, size: int, ng_fraction: float, classes: Sequence[str]) -> None:
    if count < 2:
        raise DemoDataError(f"demo count {count} is too small; pass --count 2 or more (demo.count)")
    if size < MIN_SIZE:
        raise DemoDataError(f"demo.size {size} is too small; set it to {MIN_SIZE} or more in params.yaml")
    if not 0.0 <= ng_fraction <= 1.0:
        raise DemoDataError(f"demo.ng_fraction {ng_fraction} must lie in [0, 1]; fix it in params.yaml")
    if len(classes) != 2 or len(set(classes)) != 2:
        raise DemoDataError(f"need two different class names, got {list(classes)}; fix data.classes")


def _refuse_filled_folders(out_dir: Path, classes: Sequence[str]) -> None:
    """Never mix synthetic images with real ones, nor overwrite a previous set."""
    for name in classes:
        folder = out_dir / name
        if folder.is_dir() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise DemoDataError(
                f"{folder}: class folder already holds files; demo data goes only into empty or "
                f"new folders: pass another directory, or move those files away first"
            )


def _move_in(source: Path, target: Path) -> None:
    """Rename the finished class folder into place, or move its files into an empty one."""
    if not target.exists():
        source.rename(target)
        return
    for path in sorted(source.iterdir()):
        path.rename(target / path.name)
