"""Broken inputs of DESIGN section 7, drawn from a good tiny image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import draw_tiny_fan


def good_image(seed: int = 99) -> Image.Image:
    return draw_tiny_fan(np.random.default_rng(seed), defective=False)


def write_corrupt_png(path: Path) -> Path:
    """A PNG whose pixel data is damaged, so its checksum no longer matches."""
    buffer = io.BytesIO()
    good_image().save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 20] = bytes(10)
    path.write_bytes(bytes(data))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    good_image().save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text_as_png(path: Path) -> Path:
    path.write_text("lot 4711, operator notes\n")
    return path


def write_bomb_png(path: Path, side: int) -> Path:
    """A small file that decodes to side x side pixels (a compressed 1-bit PNG)."""
    Image.new("1", (side, side)).save(path, optimize=True)
    return path



# Files that Pillow opens but the pipeline refuses (DESIGN section 7, issue 15): each
# writer returns its path; the file name may lie about the format, as on a real share.
def write_one_pixel_png(path: Path) -> Path:
    Image.new("RGB", (1, 1), (200, 200, 200)).save(path, format="PNG")
    return path


def write_16_bit_png(path: Path) -> Path:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(ramp).save(path, format="PNG")
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    good_image().convert("CMYK").save(path, format="JPEG")
    return path


def write_gif_named_png(path: Path) -> Path:
    good_image().save(path, format="GIF")
    return path


def write_animated_png(path: Path) -> Path:
    good_image().save(path, format="PNG", save_all=True, append_images=[good_image(seed=7)])
    return path


def write_default_bomb(path: Path) -> Path:
    """8000x8000 pixels in a few KB: above validate.max_pixels (50 M) of the defaults."""
    return write_bomb_png(path, 8000)


HOSTILE_IMAGES = {
    "one_pixel.png": write_one_pixel_png,
    "sixteen_bit.png": write_16_bit_png,
    "cmyk.jpg": write_cmyk_jpeg,
    "gif_named.png": write_gif_named_png,
    "animated.png": write_animated_png,
    "bomb.png": write_default_bomb,
}
