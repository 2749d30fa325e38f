"""DVC at data-set scale: a no-change `dvc repro` and the snapshot after a 100-image ingest.

In a throwaway git + DVC project (local remote in the same temp folder) with the real
dvc.yaml and tiny model params:

1. draw ``--images`` small PNGs into data/GO and data/NG, `dvc add` + `dvc push` them;
2. `dvc repro` once (every stage runs), then time `dvc status` and a no-change `dvc repro`;
3. ingest ``--added`` new images and time each step: judging the batch, building and
   swapping in the new folder, `dvc add` (the snapshot), `dvc push`;
4. for comparison, the same `dvc add` through DVC's Python API instead of the CLI.

    python bench/dvc_snapshot.py [--images 10000] [--added 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.data import ingest  # noqa: E402
from tasks.data.ingest_transaction import add_to_data  # noqa: E402
from tasks.data.snapshot import run_dvc, snapshot_data  # noqa: E402
from tests.dvc_support import make_pipeline_repo, tool_env  # noqa: E402

SIDE = 32


def draw_images(folder: Path, count: int, seed: int) -> None:
    """``count`` distinct noise PNGs per class; GO brighter than NG."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("GO", "NG")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count // 2):
            pixels = rng.integers(0, 160 + 90 * (1 - label), (SIDE, SIDE, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / name / f"{seed}_{index:05d}.png")


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=repo, env=tool_env(), capture_output=True, text=True,
                          check=True)


def median_of(runs: int, action: Callable[[], object]) -> float:
    return statistics.median(timed(action) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--added", type=int, default=100)
    parser.add_argument("--keep", help="build the project here and keep it (default: temp)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fanaoi-dvc-bench-"))
    try:
        run_benchmark(root, args.images, args.added)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run_benchmark(root: Path, images: int, added: int) -> None:
    repo = make_pipeline_repo(root / "repo", root / "remote")
    dvc = str(Path(sys.executable).parent / "dvc")
    draw_images(repo / "data", images, seed=1)
    first_add = timed(lambda: snapshot_data(repo, push=False))
    first_push = timed(lambda: run_dvc(repo, "push"))
    print(f"{images} images ({SIDE}x{SIDE} PNG): first dvc add {first_add:.1f} s, "
          f"first dvc push {first_push:.1f} s")

    full_run = timed(lambda: cli(repo, dvc, "repro"))
    cli(repo, "git", "add", "data.dvc", "dvc.lock")
    cli(repo, "git", "commit", "--quiet", "-m", "first run")
    status = median_of(3, lambda: cli(repo, dvc, "status"))
    no_change = median_of(3, lambda: cli(repo, dvc, "repro"))
    print(f"dvc repro, every stage: {full_run:.1f} s; then dvc status {status:.2f} s, "
          f"no-change dvc repro {no_change:.2f} s (median of 3)")

    params = load_params(repo / "params.yaml")
    batch = root / "batch"
    draw_images(batch, added, seed=2)
    data_dir = repo / params.data.dir
    started = time.perf_counter()
    verdicts = ingest.judge_batch(batch, data_dir, params, params.data.dir)
    judged = time.perf_counter()
    accepted = [v for v in verdicts if v.verdict == ingest.ACCEPTED]
    add_to_data(data_dir, ingest.added_files(accepted), [])
    swapped = time.perf_counter()
    add = timed(lambda: snapshot_data(repo, params.data.dir, push=False))
    push = timed(lambda: run_dvc(repo, "push"))
    print(f"ingest of {len(accepted)} images into {images}: judge {judged - started:.2f} s, "
          f"build + swap {swapped - judged:.2f} s, dvc add {add:.2f} s, dvc push {push:.2f} s")

    compare_cli_with_api(repo, data_dir)


def compare_cli_with_api(repo: Path, data_dir: Path) -> None:
    """The same one-image `dvc add` through the CLI (as snapshot_data does) and the API."""
    draw_images(data_dir, 2, seed=3)
    cli_add = timed(lambda: snapshot_data(repo, push=False))
    draw_images(data_dir, 2, seed=4)
    import_seconds = timed(lambda: importlib.import_module("dvc.repo"))
    from dvc.repo import Repo

    def api_add() -> None:
        with Repo(str(repo)) as project:
            project.add([str(data_dir)])

    api_seconds = timed(api_add)
    print(f"dvc add after one more image: CLI subprocess {cli_add:.2f} s; Python API "
          f"{api_seconds:.2f} s in-process (+ {import_seconds:.2f} s to import dvc once)")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
