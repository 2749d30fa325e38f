"""Model quality on real photos: the seed's recipe vs the default pipeline, same split, same run.

Point it at any data set laid out like data/ (GO/ and NG/, NG may hold one subfolder per
defect type). Both recipes train on the content-hash train split (data section of
params.yaml), keep watch on the validation split, and are scored on the test split, which
neither sees in training:

- seed:     seed_cnn 80x80 rgb, adam 1e-3, 10 epochs, batch 32, threshold 0.5 (the seed's notebook)
- default:  the `model` and `train` sections of params.yaml, with the threshold the pipeline
            publishes (gate.target_escape_rate calibration on validation, or evaluate.threshold)

Each training runs in a fresh process (in one process later fits are slowed by earlier
ones), the two recipes alternating per seed. It prints, per recipe, mean ± std over seeds:
test accuracy, escape, overkill and review rates, AUC, training seconds (wall clock and the
process's CPU time, which a shared VM's stolen time does not inflate), images/s and
parameters, then the ratios the model-quality targets are stated in.

``--per-epoch`` also scores the test split (threshold 0.5) with the weights each epoch's
validation saw, and prints them beside the validation loss: what any other epoch-keeping
rule would have scored. Its prediction passes count in the training seconds.

    python bench/real_quality.py DATA_DIR [--seeds 3] [--params params.yaml] [--out FILE.json] [--per-epoch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.params import load_params  # noqa: E402
from tasks.params import ModelParams, Params, TrainParams, replace  # noqa: E402

RECIPES = ("seed", "default")
SEED_RECIPE = Path(__file__).with_name("seed_recipe.yaml")
COLUMNS = (
    ("accuracy", "test accuracy", 4), ("escape_rate", "escape", 4), ("overkill_rate", "overkill", 4),
    ("review_rate", "review", 4), ("auc", "AUC", 4), ("seconds", "train s", 1), ("cpu_seconds", "train CPU s", 1),
    ("images_per_second", "img/s", 0), ("parameters", "params", 0), ("epochs", "epochs", 1),
)


def recipe_params(params: Params, recipe: str, seed: int, data_dir: str) -> Params:
    """The params one training of ``recipe`` runs with: data from DATA_DIR, seed ``seed``."""
    data = replace(params.data, dir=data_dir)
    if recipe == "seed":
        # The seed notebook's recipe; threshold 0.5, no calibration.
        seed_recipe = yaml.safe_load(SEED_RECIPE.read_text(encoding="utf-8"))
        return replace(
            params, data=data, model=ModelParams.checked(seed_recipe["model"]),
            train=TrainParams.checked({**seed_recipe["train"], "seed": seed}),
            evaluate=replace(params.evaluate, threshold=0.5, review_band=None),
            gate=replace(params.gate, target_escape_rate=None),
        )
    return replace(params, data=data, train=replace(params.train, seed=seed))


def test_scorer(test: list, model_params: ModelParams, batch_size: int, scores: list[dict[str, float]]):
    """A callback that scores ``test`` at threshold 0.5 whenever validation starts, into ``scores``.

    It runs after train_model's own callbacks, so it sees the weights validation sees (the
    weight average, when train.average_momentum is on).
    """
    import keras
    import numpy as np

    from tasks.data.dataset import labels_of, make_dataset

    labels = np.asarray(labels_of(test)) == 1
    dataset = make_dataset(test, model_params, batch_size).map(lambda x, _: x)

    class TestScorer(keras.callbacks.Callback):
        def on_test_begin(self, logs: dict | None = None) -> None:
            ng = self.model.predict(dataset, verbose=0).reshape(-1) >= 0.5
            scores.append({"test_accuracy": float(np.mean(ng == labels)), "test_escapes": int(np.sum(labels & ~ng))})

    return TestScorer()


def train_and_score(params: Params, per_epoch: bool = False) -> dict[str, float]:
    """Train on the train split, choose the threshold on validation, score the test split."""
    import numpy as np

    from tasks.data.dataset import labels_of, list_images, resolve_color_mode, select
    from tasks.inference.metrics import choose_threshold, classification_metrics
    from tasks.inference.predictor import predict_probabilities
    from tasks.model.history import kept_epoch
    from tasks.model.train import train_model

    images = list_images(params.data.dir, params.data)
    train, validation, test = (select(images, split) for split in ("train", "validation", "test"))
    model_params = resolve_color_mode(train, params.model)
    batch = params.evaluate.batch_size
    epoch_scores: list[dict[str, float]] = []
    scorer = [test_scorer(test, model_params, batch, epoch_scores)] if per_epoch else []
    started, cpu_started = time.perf_counter(), time.process_time()
    model, history = train_model(train, validation, model_params, params.train, report=lambda _: None,
                                 validation_batch_size=batch, extra_callbacks=scorer)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    validation_scores = predict_probabilities(model, validation, model_params, batch)
    chosen = choose_threshold(np.asarray(labels_of(validation)), validation_scores,
                              params.gate.target_escape_rate, params.evaluate.threshold)
    test_scores = predict_probabilities(model, test, model_params, batch)
    metrics = classification_metrics(labels_of(test), test_scores, chosen["threshold"], params.evaluate.review_band)
    return {
        **{key: metrics[key] for key in ("accuracy", "escape_rate", "overkill_rate", "review_rate", "auc")},
        "threshold": chosen["threshold"],
        "threshold_source": chosen["source"],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "images_per_second": len(train) * len(history) / seconds,
        "parameters": int(model.count_params()),
        "epochs": len(history),
        "kept_epoch": int(kept_epoch(history, params.train.keep_tolerance)["epoch"]),
        "images": {"train": len(train), "validation": len(validation), "test": len(test),
                   "test_ng": int(sum(labels_of(test)))},
        "per_epoch": [{"epoch": int(row["epoch"]), "val_loss": row["val_loss"], **scores}
                      for row, scores in zip(history, epoch_scores, strict=True)] if per_epoch else [],
    }


def run_in_fresh_process(
    params_file: str, data_dir: str, recipe: str, seed: int, per_epoch: bool = False
) -> dict[str, float]:
    command = [sys.executable, __file__, data_dir, "--params", params_file,
               "--worker", json.dumps({"recipe": recipe, "seed": seed, "per_epoch": per_epoch})]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def print_epochs(run: dict) -> None:
    """With --per-epoch: every epoch's validation loss and test score, the kept epoch marked."""
    for row in run["per_epoch"]:
        mark = "  <- kept" if row["epoch"] == run["kept_epoch"] else ""
        print(f"  epoch {row['epoch']:3d}  val loss {row['val_loss']:.4f}  test accuracy {row['test_accuracy']:.4f}  "
              f"escapes {row['test_escapes']}{mark}", flush=True)


def summarize(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {
        key: (statistics.mean(r[key] for r in runs), statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0)
        for key, _, _ in COLUMNS
    }


def print_table(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    summaries = {recipe: summarize(runs) for recipe, runs in results.items()}
    print("| recipe | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for recipe, summary in summaries.items():
        cells = [f"{summary[key][0]:.{digits}f} ± {summary[key][1]:.{digits}f}" for key, _, digits in COLUMNS]
        print(f"| {recipe} | " + " | ".join(cells) + " |")
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", help="write every run's numbers to this JSON file")
    parser.add_argument("--per-epoch", action="store_true", help="also score the test split after every epoch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(train_and_score(recipe_params(params, job["recipe"], job["seed"], args.data_dir),
                                         job["per_epoch"])))
        return
    seeds = [params.train.seed + offset for offset in range(args.seeds)]
    results: dict[str, list[dict[str, float]]] = {recipe: [] for recipe in RECIPES}
    for seed in seeds:
        for recipe in RECIPES:
            run = run_in_fresh_process(args.params, args.data_dir, recipe, seed, args.per_epoch)
            results[recipe].append(run)
            print(f"{recipe} seed {seed}: accuracy {run['accuracy']:.4f} escape {run['escape_rate']:.4f} "
                  f"overkill {run['overkill_rate']:.4f} auc {run['auc']:.4f} {run['seconds']:.0f}s "
                  f"({run['epochs']} epochs, kept {run['kept_epoch']}; threshold {run['threshold']:.3f}: "
                  f"{run['threshold_source']})", flush=True)
            print_epochs(run)
    images = results["seed"][0]["images"]
    print(f"\n{args.data_dir}: {images['train']} train, {images['validation']} validation, "
          f"{images['test']} test images ({images['test_ng']} NG); seeds {seeds}\n")
    summaries = print_table(results)
    seed, default = summaries["seed"], summaries["default"]
    print(f"\nescape rate default / seed: {default['escape_rate'][0] / max(seed['escape_rate'][0], 1e-9):.2f} "
          f"(target <= 0.25)")
    print(f"accuracy default - seed: {default['accuracy'][0] - seed['accuracy'][0]:+.4f} (target > 0)")
    print(f"accuracy std over seeds, default: {100 * default['accuracy'][1]:.2f} points (target <= 0.5)")
    print(f"training time default / seed: {default['seconds'][0] / seed['seconds'][0]:.2f} (target <= 2); "
          f"CPU time {default['cpu_seconds'][0] / seed['cpu_seconds'][0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
