"""Training throughput: the seed's recipe vs this pipeline vs the model's compute limit.

All three train the same model (params.yaml `model`, batch size from `train`) in one run
on this machine, on the same image files:

- seed:     ImageDataGenerator(rescale=1/255, validation_split=0.2) + flow_from_directory
- pipeline: tasks.data.dataset.make_dataset (tf.data: parallel decode, uint8 cache, prefetch)
- streamed (``--stream``): the same pipeline with no cache (cache_max_mb 0, or past it with
  no cache folder): every epoch decodes the files again
- file cache (``--file-cache``): the same pipeline past train.cache_max_mb with a cache
  folder: decoded once into a file before the first epoch (its time printed apart), read
  from it every epoch
- compute:  random tensors already in memory, same shapes and batch size

Steady-state images/s exclude the first epoch (graph tracing, file cache warm-up).
Targets on CPU: pipeline >= 0.90 x compute, pipeline >= 1.4 x seed.

Each measurement runs in a fresh process, interleaved over ``--rounds``, best kept. Thread
settings are TensorFlow's environment variables, e.g.
``TF_NUM_INTRAOP_THREADS=2 TF_NUM_INTEROP_THREADS=1 python bench/train_throughput.py``.

    python bench/train_throughput.py [--images 3200] [--epochs 4] [--rounds 2] [--data DIR]
        [--xla] [--bfloat16] [--one-step] [--stream] [--file-cache]
    python bench/train_throughput.py --data DIR --file-cache-only [--rounds 2] [--epochs 2]

``--file-cache-only`` is the check for sets past the memory budget (100,000 images): the
file-cached pipeline against the compute limit, interleaved over the rounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.data.dataset import list_images, make_dataset, resolve_color_mode  # noqa: E402
from tasks.model.network import build_model  # noqa: E402
from tasks.params import Params, replace  # noqa: E402


class EpochTimer:
    def __init__(self) -> None:
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.perf_counter(), time.process_time()

            def on_epoch_end(self, epoch, logs=None):
                outer.seconds.append(time.perf_counter() - outer.started[0])
                outer.cpu_seconds.append(time.process_time() - outer.started[1])

        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # of this process, all threads: what other load cannot inflate
        self.callback = Callback()

    def steady_rate(self, images: int) -> float:
        steady = self.seconds[1:] or self.seconds
        steady_cpu = self.cpu_seconds[1:] or self.cpu_seconds
        print(f"cpu-ms-per-image {1000 * sum(steady_cpu) / len(steady_cpu) / images:.2f}")
        return images / (sum(steady) / len(steady))


VARIANTS = {  # name -> how fit_rate changes the model from params.yaml's
    "plain": "as params.yaml says",
    "xla": "jit_compile=True",
    "bfloat16": "Keras mixed_bfloat16 policy (bfloat16 compute, float32 weights)",
    "one-step": "steps_per_execution 1 (a Python call per step)",
}


def fit_rate(params: Params, data, images: int, epochs: int, variant: str = "plain") -> float:
    import keras

    keras.utils.set_random_seed(params.train.seed)
    if variant == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    steps_per_execution = 1 if variant == "one-step" else params.train.steps_per_execution
    model = build_model(params.model, params.train.learning_rate, variant == "xla", steps_per_execution)
    timer = EpochTimer()
    model.fit(data, epochs=epochs, callbacks=[timer.callback], verbose=0)
    return timer.steady_rate(images)


def seed_recipe_rate(params: Params, data_dir: Path, epochs: int, variant: str = "plain") -> tuple[float, int]:
    import tensorflow as tf

    generator = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255, validation_split=0.2)
    flow = generator.flow_from_directory(
        str(data_dir), target_size=tuple(params.model.input_size), batch_size=params.train.batch_size,
        class_mode="binary", subset="training", seed=params.train.seed, color_mode=params.model.color_mode,
    )
    return fit_rate(params, flow, flow.samples, epochs, variant), flow.samples


def pipeline_rate(
    params: Params, data_dir: Path, epochs: int, variant: str = "plain", *, cache_max_mb: float | None = None,
    cache_dir: str | None = None,
) -> tuple[float, int]:
    import numpy as np

    images = list_images(data_dir, params.data)
    # The same share of files as the seed's 80 % training subset, picked by content hash.
    order = np.random.default_rng(0).permutation(len(images))
    share = [images[i] for i in order[: int(len(images) * 0.8)]]
    started = time.perf_counter()
    data = make_dataset(share, params.model, params.train.batch_size, shuffle_seed=params.train.seed,
                        cache_max_mb=cache_max_mb, cache_dir=cache_dir)
    print(f"made in {time.perf_counter() - started:.1f} s")  # the file cache is written here
    return fit_rate(params, data, len(share), epochs, variant), len(share)


def streamed_rate(params: Params, data_dir: Path, epochs: int, variant: str = "plain") -> tuple[float, int]:
    return pipeline_rate(params, data_dir, epochs, variant, cache_max_mb=0)


def file_cache_rate(params: Params, data_dir: Path, epochs: int, variant: str = "plain") -> tuple[float, int]:
    """The pipeline over any memory budget, cached to a file in a fresh folder; prints the write time."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("FANAOI_BENCH_CACHE_DIR")) as cache_dir:
        return pipeline_rate(params, data_dir, epochs, variant, cache_max_mb=1e-6, cache_dir=cache_dir)


COMPUTE_DISTINCT_IMAGES = 4096  # float32 at 128 px RGB: 0.8 GB, where 80,000 would need 15.7 GB


def compute_limit_rate(params: Params, data_dir: Path, epochs: int, variant: str = "plain") -> tuple[float, int]:
    """The same model on random tensors already in memory, as many as the pipeline's images per
    epoch: up to COMPUTE_DISTINCT_IMAGES distinct ones, repeated (the arithmetic per image is
    the same whatever the tensors hold)."""
    import numpy as np
    import tensorflow as tf

    count = int(len(list_images(data_dir, params.data)) * 0.8)
    distinct = min(count, COMPUTE_DISTINCT_IMAGES)
    height, width = params.model.input_size
    rng = np.random.default_rng(0)
    x = rng.random((distinct, height, width, params.model.channels), dtype=np.float32)
    y = rng.integers(0, 2, distinct).astype(np.float32)
    batch = params.train.batch_size
    data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().repeat()
            .take(-(-count // batch)).prefetch(2))
    return fit_rate(params, data, count, epochs, variant), count


MEASUREMENTS = {
    "seed": seed_recipe_rate, "pipeline": pipeline_rate, "compute": compute_limit_rate, "streamed": streamed_rate,
    "filecache": file_cache_rate,
}


def measure_in_fresh_process(
    args: argparse.Namespace, data_dir: Path, what: str, variant: str
) -> tuple[float, int, str, float]:
    """Each measurement in its own process: an earlier one's threads, memory and dtype policy do not count.

    Returns images/s, images per epoch, the seconds the pipeline took to make (or "") and the
    CPU milliseconds per image of the steady epochs.
    """
    command = [sys.executable, __file__, "--params", args.params, "--data", str(data_dir),
               "--epochs", str(args.epochs), "--measure", what, "--variant", variant]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    rate, count = lines[-1].split()
    made = next((line.split()[2] for line in lines if line.startswith("made in ")), "")
    cpu = next(float(line.split()[1]) for line in lines if line.startswith("cpu-ms-per-image "))
    return float(rate), int(count), made, cpu


def print_results(
    args: argparse.Namespace, best: dict[tuple[str, str], float], made: dict[tuple[str, str], list[str]],
    cpu: dict[tuple[str, str], float], *, count: int, extra: list[str], load_before: float,
) -> None:
    """The images/s of each measurement and their ratios, with the load they were taken at."""
    compute = best["compute", "plain"]
    seed, pipeline = best.get(("seed", "plain")), best.get(("pipeline", "plain"))
    intra, inter = (os.environ.get(f"TF_NUM_{kind}OP_THREADS", "default") for kind in ("INTRA", "INTER"))
    print(f"{count} images per epoch, {args.epochs} epochs, best of {args.rounds} fresh processes; "
          f"intra/inter-op threads {intra}/{inter}; load (1 min) {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    if pipeline is not None:
        print(f"seed recipe (ImageDataGenerator)  {seed:8.0f} img/s")
        print(f"tf.data pipeline                  {pipeline:8.0f} img/s")
    print(f"compute limit (in-memory tensors) {compute:8.0f} img/s")
    if pipeline is not None:
        print(f"pipeline / compute limit = {pipeline / compute:.2f}   (target >= 0.90)")
        print(f"pipeline / seed recipe   = {pipeline / seed:.2f}   (target >= 1.40)")
        print(f"compute limit / seed     = {compute / seed:.2f}   (the most any input pipeline can gain)")
    if args.stream:
        streamed = best["streamed", "plain"]
        print(f"streamed (no cache)               {streamed:8.0f} img/s ({streamed / pipeline:.2f} x cached, "
              f"{streamed / compute:.2f} x compute)")
    if args.file_cache or args.file_cache_only:
        cached = best["filecache", "plain"]
        versus_memory = f"{cached / pipeline:.2f} x memory cache, " if pipeline is not None else ""
        print(f"file cache (decoded once, read)   {cached:8.0f} img/s ({versus_memory}"
              f"{cached / compute:.2f} x compute); file written in {' / '.join(made['filecache', 'plain'])} s")
    if args.file_cache_only:
        print(f"file cache / compute limit = {cached / compute:.2f}   (target >= 0.90)")
    print("CPU ms per image (this process, steady epochs; least of the rounds): "
          + ", ".join(f"{what if variant == 'plain' else f'{what} {variant}'} {ms:.2f}"
                      for (what, variant), ms in cpu.items()))
    for variant in extra:
        other_pipeline, other_compute = best["pipeline", variant], best["compute", variant]
        print(f"{VARIANTS[variant]}:")
        print(f"  compute limit {other_compute:8.0f} img/s ({other_compute / compute:.2f} x plain)")
        print(f"  pipeline      {other_pipeline:8.0f} img/s ({other_pipeline / pipeline:.2f} x plain)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", help="existing data set (default: a fresh demo set)")
    parser.add_argument("--images", type=int, default=3200, help="demo images to draw")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="each measurement's best of this many")
    parser.add_argument("--xla", action="store_true", help="also measure jit_compile=True")
    parser.add_argument("--bfloat16", action="store_true", help="also measure the mixed_bfloat16 policy")
    parser.add_argument("--one-step", action="store_true", help="also measure steps_per_execution 1")
    parser.add_argument("--stream", action="store_true", help="also measure the pipeline without its cache")
    parser.add_argument("--file-cache", action="store_true",
                        help="also measure the pipeline cached to a file (in $FANAOI_BENCH_CACHE_DIR or /tmp)")
    parser.add_argument("--file-cache-only", action="store_true",
                        help="measure only the file-cached pipeline and the compute limit: how a set past "
                             "train.cache_max_mb trains (the seed recipe and the memory cache add ~40 min at 100k)")
    parser.add_argument("--measure", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.file_cache_only and (args.xla or args.bfloat16 or args.one_step or args.stream or args.file_cache):
        parser.error("--file-cache-only measures the file cache and the compute limit, nothing else")
    params = load_params(args.params)
    if args.measure:
        data_dir = Path(args.data)
        params = replace(params, data=replace(params.data, dir=str(data_dir)))
        # model.color_mode auto: decided from the images, as training does
        params = replace(params, model=resolve_color_mode(list_images(data_dir, params.data), params.model))
        rate, count = MEASUREMENTS[args.measure](params, data_dir, args.epochs, args.variant)
        print(f"{rate:.3f} {count}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data) if args.data else Path(scratch) / "data"
        if not args.data:
            from tasks.data.demo_set import generate_demo_dataset

            demo = params.demo
            generate_demo_dataset(data_dir, args.images, demo.seed, demo.size, demo.ng_fraction,
                                  params.data.classes)
        plans = ([("compute", "plain"), ("filecache", "plain")] if args.file_cache_only
                 else [("seed", "plain"), ("pipeline", "plain"), ("compute", "plain")])
        extra = [name for name, wanted in (("xla", args.xla), ("bfloat16", args.bfloat16),
                                           ("one-step", args.one_step)) if wanted]
        plans += [(what, variant) for variant in extra for what in ("pipeline", "compute")]
        if args.stream:
            plans += [("streamed", "plain")]
        if args.file_cache:
            plans += [("filecache", "plain")]
        best: dict[tuple[str, str], float] = {}
        made: dict[tuple[str, str], list[str]] = {}
        cpu: dict[tuple[str, str], float] = {}
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):  # interleaved, so a noisy minute hits every measurement
            for plan in plans:
                rate, count, seconds, cpu_ms = measure_in_fresh_process(args, data_dir, *plan)
                best[plan] = max(best.get(plan, 0.0), rate)
                made.setdefault(plan, []).append(seconds)
                cpu[plan] = min(cpu.get(plan, float("inf")), cpu_ms)
        print_results(args, best, made, cpu, count=count, extra=extra, load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
