"""Validation throughput: a cold run vs a warm one after the data set grew by 1 %.

Both runs are the whole validate stage (tasks.validate.run_validate: manifest, GX suite,
validation.json and its page) on the same generated data set, in one process:

- cold: empty manifest cache, every image read, hashed and decoded
- warm: after adding 1 % new images; only those are decoded, the rest come from the
  (path, size, mtime) cache

Great Expectations is imported once before either run (its import costs seconds in any
process and is the same for both); that time is printed separately.
Target: warm >= 5,000 images/s.

    python bench/validate_throughput.py [--images 10000] [--size 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.params import Params, replace  # noqa: E402
from tasks.validate import run_validate  # noqa: E402
from tests.conftest import draw_tiny_fan  # noqa: E402

WARM_TARGET = 5000.0


def add_images(data_dir: Path, count: int, size: int, seed: int, prefix: str) -> None:
    """``count`` distinct small PNGs, split evenly between GO and NG."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        name = "NG" if index % 2 else "GO"
        folder = data_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        draw_tiny_fan(rng, defective=name == "NG", size=size).save(folder / f"{prefix}{index:06d}.png")


def timed_validate(params: Params, reports: Path) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds of this process (less noisy on a shared machine), result."""
    started, cpu = time.perf_counter(), time.process_time()
    result = run_validate(params, reports, report=lambda _: None)
    return time.perf_counter() - started, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32, help="side of each image, pixels")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    import great_expectations  # noqa: F401

    print(f"great_expectations import: {time.perf_counter() - started:.1f} s (once per process)")
    with tempfile.TemporaryDirectory(prefix="fanaoi-bench-") as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        started = time.perf_counter()
        add_images(data_dir, args.images, args.size, seed=1, prefix="base_")
        print(f"generated {args.images} images of {args.size}x{args.size} px "
              f"in {time.perf_counter() - started:.1f} s")
        base = load_params(args.params)
        params = replace(
            base,
            data=replace(base.data, dir=str(data_dir)),
            validate=replace(base.validate, cache_dir=str(root / "cache")),
        )
        cold_seconds, cold_cpu, cold = timed_validate(params, root / "reports")
        added = max(1, args.images // 100)
        add_images(data_dir, added, args.size, seed=2, prefix="new_")
        warm_seconds, warm_cpu, warm = timed_validate(params, root / "reports")

    cold_rate = cold["images"] / cold_seconds
    warm_rate = warm["images"] / warm_seconds
    print(f"cold: {cold['images']} images in {cold_seconds:.2f} s (cpu {cold_cpu:.2f} s) "
          f"= {cold_rate:,.0f} images/s")
    print(f"warm: {warm['images']} images (+{added} new) in {warm_seconds:.2f} s "
          f"(cpu {warm_cpu:.2f} s) = {warm_rate:,.0f} images/s  "
          f"({warm['warnings']} warnings, valid={warm['valid']})")
    verdict = "meets" if warm_rate >= WARM_TARGET else "MISSES"
    print(f"warm / cold = {warm_rate / cold_rate:.1f}x; warm {verdict} the target of "
          f"{WARM_TARGET:,.0f} images/s")


if __name__ == "__main__":
    main()
