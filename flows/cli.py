"""The ``fanaoi`` command line: a thin layer over ``tasks``.

Heavy packages (TensorFlow, Great Expectations, Prefect) are imported inside the
commands that need them, so ``fanaoi --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.params import DEFAULT_PARAMS, load_params
from tasks.errors import FanaoiError
from tasks.params import Params

log = logging.getLogger("fanaoi")

# Errors a user can fix: printed as one line, exit 1, no traceback. OSError carries the
# file name (disk full, permission denied, missing file).
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FanaoiError, OSError)

Command = Callable[[argparse.Namespace, Params], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = function
        return function

    return register


@command("demo-data")
def _demo_data(args: argparse.Namespace, params: Params) -> int:
    from tasks.demo_data import generate_demo_dataset

    demo = params.demo
    counts = generate_demo_dataset(
        Path(args.directory or params.data.dir),
        count=args.count if args.count is not None else demo.count,
        seed=args.seed if args.seed is not None else demo.seed,
        size=demo.size,
        ng_fraction=demo.ng_fraction,
        classes=params.data.classes,
    )
    print(", ".join(f"{n} {name}" for name, n in counts.items()), "images in", args.directory or params.data.dir)
    return 0


@command("train")
def _train(args: argparse.Namespace, params: Params) -> int:
    from tasks.train import run_train

    summary = run_train(params, args.model, args.reports)
    last = summary["last_epoch"]
    print(
        f"candidate: {args.model}  last epoch accuracy {last['accuracy']:.4f}, "
        f"val_accuracy {last['val_accuracy']:.4f}  ({summary['seconds']:.0f}s)"
    )
    return 0


@command("evaluate")
def _evaluate(args: argparse.Namespace, params: Params) -> int:
    from tasks.evaluate import run_evaluate

    result = run_evaluate(params, args.model, args.reports)
    validation, comparison = result["validation"], result["last_epoch_vs_evaluate"]
    print(
        f"validation accuracy {validation['accuracy']:.4f}  escape {validation['escape_rate']:.4f}  "
        f"overkill {validation['overkill_rate']:.4f}  evaluate-vs-last-epoch gap "
        f"{comparison['validation_accuracy_gap']:.4f}  -> {Path(args.reports) / 'evaluation.json'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanaoi",
        description="FanAOI: retrain, check and publish the GO/NG fan inspection model.",
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="draw a synthetic GO/NG fan image data set")
    demo.add_argument("directory", nargs="?", help="output folder (default: data.dir)")
    demo.add_argument("--count", type=int, help="number of images (default: demo.count)")
    demo.add_argument("--seed", type=int, help="random seed (default: demo.seed)")

    for name, text in (
        ("train", "train a candidate model on the train split"),
        ("evaluate", "score the candidate; compare evaluate() with the last epoch"),
    ):
        stage = sub.add_parser(name, help=text)
        stage.add_argument("--model", default="models/candidate.h5", help="candidate path")
        stage.add_argument("--reports", default="reports", help="reports folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        params = load_params(args.params)
        return COMMANDS[args.command](args, params)
    except EXPECTED_ERRORS as exc:
        print(f"fanaoi {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fanaoi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
