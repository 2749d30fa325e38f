"""Export sizes and predict throughput: TFLite (LiteRT) and ONNX (onnxruntime) versus Keras.

On a demo-sized champion (params.yaml `model`: the seed CNN at 80x80), in one process:

1. a registry: a copy of --registry (never changed), or, without it, a temporary one whose
   champion is trained here for --epochs on a drawn demo data set of --count images and
   published (forced: a short training need not pass the gate);
2. `fanaoi export` of the champion to each format (each checked against Keras on the
   validation images, as the command does);
3. --images validation images (repeated as needed) predicted in batches of --batch by
   Keras (`predict_on_batch`, as `fanaoi predict`), the LiteRT interpreter, onnxruntime
   and the SavedModel's `serve` endpoint, and one image at a time (what a service does).

Prints each export's size and images/s, with ratios against the .h5 file and Keras.

    python bench/export_throughput.py [--registry DIR --data DIR] [--images 1000] [--count 1200]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.params import Params, replace  # noqa: E402
from tasks.registry.export import FORMATS, check_images, export_version  # noqa: E402

REPEATS = 3  # timed passes; the best is reported (least disturbed by other processes)


def demo_registry(root: Path, params: Params, count: int, epochs: int) -> Params:
    """Params whose data set and registry (with a champion) live under ``root``."""
    from tasks.data.demo_set import generate_demo_dataset
    from tasks.data.validate import run_validate
    from tasks.model.evaluate import run_evaluate
    from tasks.model.train import run_train
    from tasks.registry.gate import run_gate
    from tasks.registry.publish import publish

    demo = params.demo
    data_dir = root / "data"
    started = time.perf_counter()
    generate_demo_dataset(data_dir, count=count, seed=demo.seed, size=demo.size,
                          ng_fraction=demo.ng_fraction, classes=params.data.classes)
    params = replace(
        params,
        data=replace(params.data, dir=str(data_dir)),
        train=replace(params.train, epochs=epochs, checkpoint_dir=str(root / "ckpt")),
        registry=replace(params.registry, dir=str(root / "registry")),
        paths=replace(params.paths, reports=str(root / "reports")),
    )
    candidate, reports = root / "candidate.h5", root / "reports"
    run_validate(params, reports, report=lambda _: None)
    summary = run_train(params, candidate, reports)
    run_evaluate(params, candidate, reports, report=lambda _: None)
    result = run_gate(params, candidate, reports, record=False)
    publish(candidate, result, params, repo_dir=root, force_reason="export benchmark",
            report=lambda _: None)
    print(f"champion: {params.model.architecture} {params.model.input_size[0]}x{params.model.input_size[1]}, "
          f"{epochs} epoch(s) on {count} demo images, validation accuracy "
          f"{summary['kept_epoch_metrics']['val_accuracy']:.3f} ({time.perf_counter() - started:.0f} s to build)")
    return params


def copied_registry(root: Path, params: Params, registry: str, data: str | None) -> Params:
    shutil.copytree(registry, root / "registry")
    return replace(
        params,
        data=replace(params.data, dir=data or params.data.dir),
        registry=replace(params.registry, dir=str(root / "registry")),
    )


def best_rate(predict: Callable[[np.ndarray], object], images: np.ndarray, batch: int) -> float:
    """Images/s of the fastest of REPEATS passes over ``images`` in batches of ``batch``."""
    predict(images[:batch])  # warm-up: graph tracing, tensor allocation
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            predict(images[start:start + batch])
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def predictors(folder: Path) -> dict[str, Callable[[np.ndarray], object]]:
    """One batch -> probabilities function per runtime, each loaded once."""
    import onnxruntime
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from tasks.inference.model_file import load_model

    keras_model = load_model(folder / "model.h5")
    interpreter = Interpreter(model_path=str(folder / "exports" / "model.tflite"))
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    shape = {"current": None}

    def litert(batch: np.ndarray) -> np.ndarray:
        if shape["current"] != batch.shape:  # resizing reallocates: only when the batch changes
            interpreter.resize_tensor_input(source["index"], list(batch.shape))
            interpreter.allocate_tensors()
            shape["current"] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"])

    session = onnxruntime.InferenceSession(
        str(folder / "exports" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    saved = tf.saved_model.load(str(folder / "exports" / "saved_model"))
    return {
        "keras": keras_model.predict_on_batch,
        "tflite": litert,
        "onnx": lambda batch: session.run(None, {input_name: batch}),
        "savedmodel": lambda batch: saved.serve(tf.constant(batch)),
    }


def add_champion_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the benchmarked champion comes from: a copied registry or a demo one."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--registry", help="registry to copy (default: build a demo one)")
    parser.add_argument("--data", help="its data set (default: data.dir of --params)")
    parser.add_argument("--count", type=int, default=1200, help="demo images to draw")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the demo champion")


def champion_for_bench(root: Path, args: argparse.Namespace) -> Params:
    """Params whose registry (under ``root``) holds the champion to measure."""
    params = load_params(args.params)
    return (copied_registry(root, params, args.registry, args.data) if args.registry
            else demo_registry(root, params, args.count, args.epochs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_champion_arguments(parser)
    parser.add_argument("--images", type=int, default=1000, help="images predicted per pass")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="fanaoi-bench-export-") as tmp:
        root = Path(tmp)
        params = champion_for_bench(root, args)
        params = replace(params, export=replace(params.export, check_images=args.images))
        from tasks.inference.model_file import model_params_from_file
        from tasks.registry.champion import champion_card

        version = champion_card(params.registry.dir)["version"]
        folder = Path(params.registry.dir) / "versions" / version
        h5_bytes = (folder / "model.h5").stat().st_size
        print(f"\n{'format':12}{'size':>12}{'vs .h5':>8}{'max |diff|':>12}  export s  runtime")
        print(f"{'keras .h5':12}{h5_bytes / 1e6:>10.2f}MB{1:>8.2f}")
        for fmt in FORMATS:
            started = time.perf_counter()
            entry = export_version(params, fmt)
            print(f"{fmt:12}{entry['bytes'] / 1e6:>10.2f}MB{entry['bytes'] / h5_bytes:>8.2f}"
                  f"{entry['max_abs_diff']:>12.2g}{time.perf_counter() - started:>10.1f}  {entry['runtime']}")

        validation = check_images(params.data, Path(params.paths.reports), model_params_from_file(folder / "model.h5"),
                                  args.images)
        images = np.resize(validation, (args.images, *validation.shape[1:])).astype(np.float32)
        print(f"\npredict {len(images)} images ({len(validation)} distinct validation images), "
              f"best of {REPEATS} passes")
        print(f"{'runtime':12}{f'batch {args.batch} img/s':>18}{'vs keras':>10}{'batch 1 img/s':>16}{'vs keras':>10}")
        rates = {name: (best_rate(run, images, args.batch), best_rate(run, images, 1))
                 for name, run in predictors(folder).items()}
        for name, (batched, single) in rates.items():
            print(f"{name:12}{batched:>18,.0f}{batched / rates['keras'][0]:>10.2f}"
                  f"{single:>16,.0f}{single / rates['keras'][1]:>10.2f}")


if __name__ == "__main__":
    main()
