"""One row per file of a data set: what Pillow says about it, hashed and cached.

``inspect_file`` never raises on a bad image: the row's ``error`` says why it cannot be
used (zero-byte, truncated, not an image, decompression bomb). The validate stage and
``fanaoi ingest`` both judge files by these rows.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# dHash: compare neighbouring pixels of a 9x8 grayscale thumbnail -> 64 bits.
_DHASH_SIZE = (9, 8)


@dataclass(frozen=True)
class FileCheck:
    path: Path
    bytes: int
    sha256: str | None
    width: int | None
    height: int | None
    mode: str | None
    format: str | None
    decodable: bool
    error: str | None
    dhash: str | None = None  # 16 hex digits, difference hash for near-duplicate search
    brightness: float | None = None  # mean grayscale intensity, 0..255


def inspect_file(path: Path, max_pixels: int) -> FileCheck:
    """Read, hash and fully decode one file; any problem goes into ``error``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _failed(path, 0, None, f"cannot read the file ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return _failed(path, 0, digest, "zero-byte file")
    try:
        with _pixel_limit(max_pixels):
            return _decode(path, data, digest)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        reason = f"decompression bomb: {pixels}, more than validate.max_pixels = {max_pixels:,}"
        return _failed(path, len(data), digest, reason)
    except UnidentifiedImageError:
        return _failed(path, len(data), digest, "not an image (Pillow cannot identify its format)")
    except Exception as exc:  # any decoder failure is a property of the file, not a crash
        return _failed(path, len(data), digest, f"truncated or corrupt image ({_describe(exc)})")


def _decode(path: Path, data: bytes, digest: str) -> FileCheck:
    # verify() checks structure and checksums but leaves the image unusable; load()
    # then decodes every pixel, which is what catches truncated JPEGs.
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        gray = image.convert("L")
        pixels = np.asarray(gray.resize(_DHASH_SIZE, Image.Resampling.BOX), dtype=np.int16)
        bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
        dhash = int.from_bytes(np.packbits(bits).tobytes(), "big")
        return FileCheck(
            path=path,
            bytes=len(data),
            sha256=digest,
            width=image.width,
            height=image.height,
            mode=image.mode,
            format=image.format,
            decodable=True,
            error=None,
            dhash=f"{dhash:016x}",
            brightness=round(float(np.asarray(gray).mean()), 3),
        )


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb guard at ``max_pixels``; its warning becomes an error."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _failed(path: Path, size: int, digest: str | None, error: str) -> FileCheck:
    return FileCheck(path, size, digest, None, None, None, None, False, error)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
