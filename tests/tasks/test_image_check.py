"""The one image check: header rules first, a full decode only for what passes them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tasks.image_check import (
    BOMB,
    ImageRejected,
    check_image,
    inspect_image,
)
from tasks.params import replace
from tests.bad_files import (
    HOSTILE_IMAGES,
    good_image,
    write_bomb_png,
    write_corrupt_png,
    write_truncated_jpeg,
)
from tests.conftest import BASE

LIMITS = BASE.validate


@pytest.mark.parametrize(
    ("name", "rule", "reason"),
    [
        ("one_pixel.png", "width_in_bounds", "width 1 px outside 16..4096"),
        ("sixteen_bit.png", "mode_allowed", "colour mode I;16 is not one of L, LA, P, RGB, RGBA"),
        ("cmyk.jpg", "mode_allowed", "colour mode CMYK is not one of"),
        ("gif_named.png", "format_allowed", "format GIF is not one of PNG, JPEG, BMP"),
        ("animated.png", "readable", "animated or multi-page image (2 frames)"),
        ("bomb.png", "readable",
         "decompression bomb: 64,000,000 pixels, more than validate.max_pixels = 50,000,000"),
    ],
)
def test_hostile_images_are_refused_from_the_header_with_the_rule(
    tmp_path: Path, name: str, rule: str, reason: str
) -> None:
    data = HOSTILE_IMAGES[name](tmp_path / name).read_bytes()

    found = inspect_image(data, LIMITS)

    problem = found.rejection({"mode_allowed", "format_allowed", "width_in_bounds"})
    assert problem is not None and problem.rule == rule and reason in problem.reason
    assert found.image is None  # never decoded: the header said enough
    with pytest.raises(ImageRejected, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        check_image(data, LIMITS)


def test_a_small_file_with_a_huge_canvas_is_not_decoded(tmp_path: Path) -> None:
    # 7000x7000 pixels (under max_pixels) in a small file: width and height are blocking.
    path = tmp_path / "canvas.png"
    Image.new("L", (7000, 7000)).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    found = inspect_image(path.read_bytes(), LIMITS)
    assert [p.rule for p in found.problems] == ["width_in_bounds", "height_in_bounds"]
    assert found.image is None and found.decodable is None


def test_pillows_own_bomb_limit_is_reported_as_a_bomb(tmp_path: Path) -> None:
    # Above twice Pillow's default limit Image.open itself refuses; same verdict.
    data = write_bomb_png(tmp_path / "huge.png", 14_000).read_bytes()
    found = inspect_image(data, LIMITS)
    (problem,) = found.problems
    assert problem.kind == BOMB and problem.reason.startswith("decompression bomb: 196,000,000 pixels")


@pytest.mark.parametrize(
    ("write", "reason"),
    [(write_corrupt_png, "truncated or corrupt image"), (write_truncated_jpeg, "truncated")],
)
def test_truncation_is_found_by_the_full_decode(tmp_path: Path, write, reason: str) -> None:
    found = inspect_image(write(tmp_path / "bad").read_bytes(), LIMITS)
    assert found.decodable is False and reason in found.problems[0].reason


def test_a_warning_rule_does_not_stop_the_decode() -> None:
    buffer = io.BytesIO()
    good_image().save(buffer, format="PNG")
    lenient = replace(BASE.validate, min_side=64, severity={**LIMITS.severity, "width_in_bounds": "warning",
                                                    "height_in_bounds": "warning"})
    found = check_image(buffer.getvalue(), lenient)  # warnings do not reject
    assert [p.rule for p in found.problems] == ["width_in_bounds", "height_in_bounds"]
    assert found.image is not None and found.image.size == (32, 32)
