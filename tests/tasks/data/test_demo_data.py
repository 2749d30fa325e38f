from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.demo_data import DEFECT_KINDS, DemoDataError, draw_demo_image, render_fan, sample_defect, sample_fan
from tasks.data.demo_set import generate_demo_dataset
from tasks.errors import FanaoiError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_writes_same_bytes(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "a", count=16, seed=7, size=48, ng_fraction=0.5)
    generate_demo_dataset(tmp_path / "b", count=16, seed=7, size=48, ng_fraction=0.5)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 16
    assert first == second


def test_other_seed_draws_other_images(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "a", count=8, seed=7, size=48, ng_fraction=0.5)
    generate_demo_dataset(tmp_path / "b", count=8, seed=8, size=48, ng_fraction=0.5)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_an_image_does_not_depend_on_how_many_are_drawn(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "small", count=6, seed=3, size=48, ng_fraction=0.5)
    generate_demo_dataset(tmp_path / "large", count=20, seed=3, size=48, ng_fraction=0.25)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert small.keys() <= large.keys()
    assert all(small[name] == large[name] for name in small)


@pytest.mark.parametrize(("count", "ng_fraction", "expected_ng"), [(20, 0.5, 10), (10, 0.3, 3), (7, 0.0, 0)])
def test_class_counts_follow_ng_fraction(
    tmp_path: Path, count: int, ng_fraction: float, expected_ng: int
) -> None:
    counts = generate_demo_dataset(
        tmp_path / "data", count=count, seed=1, size=40, ng_fraction=ng_fraction, classes=("OK", "BAD")
    )
    assert counts == {"OK": count - expected_ng, "BAD": expected_ng}
    assert len(list((tmp_path / "data" / "OK").glob("*.png"))) == count - expected_ng
    assert len(list((tmp_path / "data" / "BAD").glob("*.png"))) == expected_ng


def test_images_decode_at_the_requested_size_without_metadata(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "data", count=12, seed=2, size=64, ng_fraction=0.5)
    paths = sorted((tmp_path / "data").rglob("*.png"))
    assert len(paths) == 12
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
            assert image.info.keys() <= {"dpi", "gamma"}  # no text chunks, no timestamp


def test_defect_images_name_their_defect_and_cycle_through_all_kinds(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "data", count=24, seed=4, size=40, ng_fraction=0.5)
    kinds = sorted(p.stem.split("_", 2)[2] for p in (tmp_path / "data" / "NG").glob("*.png"))
    assert kinds == sorted(DEFECT_KINDS * 2)
    assert all(p.stem.count("_") == 1 for p in (tmp_path / "data" / "GO").glob("*.png"))


def test_refuses_a_class_folder_that_holds_files(tmp_path: Path) -> None:
    real = tmp_path / "data" / "NG" / "line3_0001.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"real image")
    with pytest.raises(DemoDataError, match=r"data/NG: class folder already holds files") as caught:
        generate_demo_dataset(tmp_path / "data", count=4, seed=1, size=40, ng_fraction=0.5)
    assert isinstance(caught.value, FanaoiError)
    assert "move those files away" in str(caught.value)
    assert real.read_bytes() == b"real image"
    assert not (tmp_path / "data" / "GO").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind


def test_fills_empty_class_folders_and_leaves_no_staging_folder(tmp_path: Path) -> None:
    (tmp_path / "data" / "GO").mkdir(parents=True)
    (tmp_path / "data" / "GO" / ".gitkeep").touch()
    counts = generate_demo_dataset(tmp_path / "data", count=6, seed=1, size=40, ng_fraction=0.5)
    assert counts == {"GO": 3, "NG": 3}
    assert len(list((tmp_path / "data" / "GO").glob("*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"count": 1}, "--count 2 or more"),
        ({"size": 16}, "demo.size 16 is too small"),
        ({"ng_fraction": 1.5}, r"demo.ng_fraction 1.5 must lie in \[0, 1\]"),
        ({"classes": ("GO", "GO")}, "two different class names"),
    ],
)
def test_rejects_unusable_arguments(tmp_path: Path, arguments: dict, message: str) -> None:
    values = {"count": 4, "seed": 1, "size": 40, "ng_fraction": 0.5} | arguments
    with pytest.raises(DemoDataError, match=message):
        generate_demo_dataset(tmp_path / "data", **values)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_changes_the_fan_it_is_drawn_on(kind: str) -> None:
    for index in range(5):
        rng = np.random.default_rng([11, index])
        fan = sample_fan(rng, 96)
        intact = _pixels(render_fan(fan))
        assert np.array_equal(intact, _pixels(render_fan(fan)))
        changed = np.abs(_pixels(render_fan(fan, sample_defect(rng, kind, fan))) - intact).max(axis=2)
        # A defect an inspector would see: tens of pixels changed by a clear step in brightness.
        assert (changed > 40).sum() >= 20, f"{kind} on fan {index}: {(changed > 40).sum()} pixels"


def test_good_images_differ_from_each_other() -> None:
    first, _ = draw_demo_image(5, 0, 0, 48)
    second, _ = draw_demo_image(5, 0, 1, 48)
    assert np.abs(_pixels(first) - _pixels(second)).mean() > 5
