"""Shared fixtures: tiny image folders made here, tiny params, one tiny trained model.

Everything runs on the CPU with one or two epochs; nothing touches the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from flows.params import params_from  # noqa: E402
from tasks.params import Params, replace  # noqa: E402

TINY_SIZE = 32
SEED_RECIPE = Path(__file__).resolve().parents[1] / "bench" / "seed_recipe.yaml"
# Unit tests start from the seed notebook's recipe with no threshold calibration and no run
# timeout: small and fast, and the settings their expectations were measured with.
BASE = params_from({
    **yaml.safe_load(SEED_RECIPE.read_text(encoding="utf-8")),
    "gate": {"target_escape_rate": None},
    "nightly": {"timeout_seconds": None},
})
HEAVY_PACKAGES = ("tensorflow", "keras", "great_expectations", "prefect", "dvc")


def heavy_packages_imported_by(statement: str) -> list[str]:
    """The heavy packages a fresh interpreter has imported after running ``statement``."""
    import subprocess
    import sys

    code = f"import sys; {statement}; print(','.join(m for m in {HEAVY_PACKAGES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [name for name in out.stdout.strip().split(",") if name]


def draw_tiny_fan(rng: np.random.Generator, defective: bool, size: int = TINY_SIZE) -> Image.Image:
    """A bright disc on a dark background; defective ones miss a wedge of the disc."""
    yy, xx = np.mgrid[0:size, 0:size]
    centre = size / 2 + rng.uniform(-1.5, 1.5, 2)
    radius = size * rng.uniform(0.33, 0.40)
    dy, dx = yy - centre[0], xx - centre[1]
    disc = dy**2 + dx**2 <= radius**2
    if defective:
        angle = np.arctan2(dy, dx)
        start = rng.uniform(-np.pi, np.pi)
        wedge = ((angle - start) % (2 * np.pi)) < 1.6
        disc &= ~wedge
    base = rng.uniform(20, 50)
    pixels = np.where(disc, rng.uniform(190, 230), base) + rng.normal(0, 6, (size, size))
    rgb = np.repeat(np.clip(pixels, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(rgb, "RGB")


def make_image_folder(
    root: Path, per_class: int = 24, seed: int = 0, classes: tuple[str, ...] = ("GO", "NG")
) -> Path:
    """root/GO and root/NG with ``per_class`` distinct PNGs each; returns root."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            draw_tiny_fan(rng, defective=label == 1).save(folder / f"{name.lower()}_{index:03d}.png")
    return root


def tiny_params(data_dir: Path, **train_overrides: object) -> Params:
    """Params for tests: 32x32 input, small model, two epochs, big validation share, reports beside data/."""
    tiny_train = {"epochs": 2, "batch_size": 16, "checkpoint_dir": str(data_dir.parent / "ckpt")}
    train = replace(BASE.train, **{**tiny_train, **train_overrides})
    return replace(
        BASE,
        data=replace(BASE.data, dir=str(data_dir), split={"train": 0.6, "validation": 0.25, "test": 0.15}),
        paths=replace(BASE.paths, reports=str(data_dir.parent / "reports")),  # beside data/, as in a project
        model=replace(BASE.model, input_size=(TINY_SIZE, TINY_SIZE), conv_filters=(8, 16), dense_units=16),
        train=train,
        evaluate=replace(BASE.evaluate, max_gap=1.0, max_overfit=1.0),
    )


def write_manifest(params: Params, reports: Path) -> Path:
    """Run the validate stage into ``reports``: the stages after it read its manifest there.

    Tiny test sets may hold fewer images per class than validate.min_per_class asks of a real
    one; that count decides nothing in the manifest, so it is relaxed here.
    """
    from tasks.data.validate import run_validate

    relaxed = replace(params, validate=replace(params.validate, min_per_class=1))
    run_validate(relaxed, reports, report=lambda _: None)
    return reports


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny data set with a trained candidate and its reports, built once per session.

    Tests must not modify these files: copy them first.
    """
    from tasks.model.train import run_train

    root = tmp_path_factory.mktemp("trained")
    data_dir = make_image_folder(root / "data", per_class=40, seed=1)
    params = tiny_params(data_dir, epochs=3)
    model_path = root / "models" / "candidate.h5"
    reports = write_manifest(params, root / "reports")
    summary = run_train(params, model_path, reports)
    return {
        "root": root, "data_dir": data_dir, "params": params,
        "model_path": model_path, "reports": reports, "summary": summary,
    }


def copy_with_defect_types(
    source: Path, target: Path, types: tuple[str, ...] = ("crack", "blowhole"), positive: str = "NG"
) -> Path:
    """A copy of an image folder with the positive-class images dealt round-robin into
    ``positive/<type>/`` subfolders and ``positive/`` itself (untyped); returns target.

    The bytes are unchanged, so every image keeps its split and a model trained on the
    source scores the copy exactly as it scores the source.
    """
    shutil.copytree(source, target)
    folder = target / positive
    for index, path in enumerate(sorted(folder.iterdir())):
        kind = (*types, None)[index % (len(types) + 1)]
        if kind is not None:
            (folder / kind).mkdir(exist_ok=True)
            path.rename(folder / kind / path.name)
    return target
