"""Throughput and latency of `fanaoi predict` with a registry's champion.

Measured in one run, on the same image files:

1. the model's compute limit: ``predict_on_batch`` on images already decoded in memory;
2. ``tasks.inference.predictor.predict_files`` (read, decode, resize, batch, predict), in images/s and
   as a ratio to the compute limit: the input pipeline should not be the bottleneck;
3. the latency of one image (one file, batch of one): p50 and p95;
4. the whole command, ``fanaoi predict FILES... --json`` in a fresh process (Python and
   TensorFlow start, model load, all files), in images/s.

    python bench/predict_throughput.py --registry registry --data data [--images 1000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.data.dataset import decode_all, list_images  # noqa: E402
from tasks.inference.predictor import predict_files  # noqa: E402
from tasks.registry.champion import load_champion  # noqa: E402


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--registry", help="registry folder (default: registry.dir of --params)")
    parser.add_argument("--data", help="image folder (default: data.dir of --params)")
    parser.add_argument("--images", type=int, default=1000, help="files per pass (repeats if fewer)")
    parser.add_argument("--batch", type=int, help="default: evaluate.batch_size")
    parser.add_argument("--latency-samples", type=int, default=50)
    args = parser.parse_args()

    params = load_params(args.params)
    registry = args.registry or params.registry.dir
    batch = args.batch or params.evaluate.batch_size
    images = list_images(args.data or params.data.dir, params.data)
    chosen = [images[i % len(images)] for i in range(args.images)]
    files = [image.path for image in chosen]

    started = time.perf_counter()
    predictor = load_champion(registry)  # the first call also imports TensorFlow
    print(f"champion {predictor.version}: loaded in {time.perf_counter() - started:.2f}s "
          f"(TensorFlow import included); {len(files)} files, batch {batch}")

    decoded = decode_all(chosen, predictor.model_params)
    batches = [decoded[i:i + batch] for i in range(0, len(decoded), batch)]
    predictor.model.predict_on_batch(batches[0])  # trace once outside the timing

    def compute_pass() -> float:
        return timed(lambda: [predictor.model.predict_on_batch(b) for b in batches])

    compute = len(files) / best_of(3, compute_pass)
    pipeline = len(files) / best_of(3, lambda: timed(lambda: predict_files(predictor, files, batch, params.validate)))

    latencies = []
    for path in files[: args.latency_samples]:
        latencies.append(timed(lambda path=path: predict_files(predictor, [path], 1, params.validate)) * 1000)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]

    wall = None
    if args.registry is None:  # the command reads the registry of --params
        command = [str(Path(sys.executable).parent / "fanaoi"), "--params", str(Path(args.params).resolve()),
                   "predict", "--json", *(str(Path(f).resolve()) for f in files)]
        project = Path(args.params).resolve().parent
        wall = timed(lambda: subprocess.run(command, check=True, capture_output=True, cwd=project))

    print(f"{'compute limit (decoded tensors)':34}{compute:>10,.0f} img/s")
    print(f"{'predict_files (read+decode+predict)':34}{pipeline:>10,.0f} img/s   "
          f"ratio to compute {pipeline / compute:.2f}")
    print(f"{'one image, batch of 1':34}  p50 {statistics.median(latencies):.1f} ms   p95 {p95:.1f} ms")
    if wall is not None:
        print(f"{'fanaoi predict --json (new process)':34}{len(files) / wall:>10,.0f} img/s   "
              f"{wall:.1f}s wall for {len(files)} files")
    else:
        print("fanaoi predict (new process): skipped with --registry (the command reads registry.dir)")


if __name__ == "__main__":
    main()
