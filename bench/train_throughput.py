"""Training throughput: the seed's recipe vs this pipeline vs the model's compute limit.

All three train the same model (params.yaml `model`, batch size from `train`) in one run
on this machine, on the same image files:

- seed:     ImageDataGenerator(rescale=1/255, validation_split=0.2) + flow_from_directory
- pipeline: tasks.dataset.make_dataset (tf.data: parallel decode, cache, prefetch)
- compute:  random tensors already in memory, same shapes and batch size

Steady-state images/s exclude the first epoch (graph tracing, file cache warm-up).
Targets on CPU: pipeline >= 0.90 x compute, pipeline >= 1.4 x seed.

    python bench/train_throughput.py [--images 3200] [--epochs 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.dataset import list_images, make_dataset  # noqa: E402
from tasks.model import build_model  # noqa: E402
from tasks.params import Params  # noqa: E402


class EpochTimer:
    def __init__(self) -> None:
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.seconds.append(time.perf_counter() - outer.started)

        self.seconds: list[float] = []
        self.callback = Callback()

    def steady_rate(self, images: int) -> float:
        steady = self.seconds[1:] or self.seconds
        return images / (sum(steady) / len(steady))


def fit_rate(params: Params, data, images: int, epochs: int, jit: bool = False) -> float:
    import keras

    keras.utils.set_random_seed(params.train.seed)
    model = build_model(params.model, params.train.learning_rate, jit_compile=jit)
    timer = EpochTimer()
    model.fit(data, epochs=epochs, callbacks=[timer.callback], verbose=0)
    return timer.steady_rate(images)


def seed_recipe_rate(params: Params, data_dir: Path, epochs: int) -> tuple[float, int]:
    import tensorflow as tf

    generator = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255, validation_split=0.2)
    flow = generator.flow_from_directory(
        str(data_dir), target_size=tuple(params.model.input_size), batch_size=params.train.batch_size,
        class_mode="binary", subset="training", seed=params.train.seed,
    )
    return fit_rate(params, flow, flow.samples, epochs), flow.samples


def pipeline_rate(params: Params, data_dir: Path, epochs: int, jit: bool = False) -> tuple[float, int]:
    import numpy as np

    images = list_images(data_dir, params.data)
    # The same share of files as the seed's 80 % training subset, picked by content hash.
    order = np.random.default_rng(0).permutation(len(images))
    share = [images[i] for i in order[: int(len(images) * 0.8)]]
    data = make_dataset(share, params.model, params.train.batch_size, shuffle_seed=params.train.seed)
    return fit_rate(params, data, len(share), epochs, jit), len(share)


def compute_limit_rate(params: Params, count: int, epochs: int, jit: bool = False) -> float:
    import numpy as np
    import tensorflow as tf

    height, width = params.model.input_size
    rng = np.random.default_rng(0)
    x = rng.random((count, height, width, params.model.channels), dtype=np.float32)
    y = rng.integers(0, 2, count).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(params.train.batch_size).cache().prefetch(2)
    return fit_rate(params, data, count, epochs, jit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", help="existing data set (default: a fresh demo set)")
    parser.add_argument("--images", type=int, default=3200, help="demo images to draw")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--xla", action="store_true", help="also measure jit_compile=True")
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data) if args.data else Path(scratch) / "data"
        if not args.data:
            from tasks.demo_data import generate_demo_dataset

            demo = params.demo
            generate_demo_dataset(data_dir, args.images, demo.seed, demo.size, demo.ng_fraction,
                                  params.data.classes)
        params = dataclasses.replace(params, data=dataclasses.replace(params.data, dir=str(data_dir)))
        seed, seed_count = seed_recipe_rate(params, data_dir, args.epochs)
        pipeline, count = pipeline_rate(params, data_dir, args.epochs)
        compute = compute_limit_rate(params, count, args.epochs)
        print(f"images per epoch: seed recipe {seed_count}, pipeline {count}; epochs {args.epochs}")
        print(f"seed recipe (ImageDataGenerator)  {seed:8.0f} img/s")
        print(f"tf.data pipeline                  {pipeline:8.0f} img/s")
        print(f"compute limit (in-memory tensors) {compute:8.0f} img/s")
        print(f"pipeline / compute limit = {pipeline / compute:.2f}   (target >= 0.90)")
        print(f"pipeline / seed recipe   = {pipeline / seed:.2f}   (target >= 1.40)")
        if args.xla:
            xla_compute = compute_limit_rate(params, count, args.epochs, jit=True)
            xla_pipeline, _ = pipeline_rate(params, data_dir, args.epochs, jit=True)
            print(f"XLA compute limit {xla_compute:8.0f} img/s ({xla_compute / compute:.2f} x plain)")
            print(f"XLA pipeline      {xla_pipeline:8.0f} img/s ({xla_pipeline / pipeline:.2f} x plain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
