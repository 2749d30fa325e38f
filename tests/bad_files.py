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

