"""The one check that decides whether bytes are a usable image: validate, ingest, predict, serve.

Cheap checks first, from the header alone (Pillow's ``Image.open`` reads the size, mode
and format without decoding a pixel): format, colour mode, width and height within
bounds, the pixel limit, a single frame. Only a file that passes every blocking one of
those is decoded in full, which is what finds truncated and corrupt files. So a 160 KB
file announcing a 7000x7000 canvas, or a decompression bomb, costs a header read.

Rules are named like the expectations of the validate stage (``validate.severity``), and
their limits come from the ``validate`` section of params: the stage, ``fanaoi ingest``,
``fanaoi predict`` and the HTTP service refuse the same files for the same reasons.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tasks.errors import FanaoiError
from tasks.params import ValidateParams

# Always blocking, whatever validate.severity says: nothing can be trained on or
# classified from a file that does not decode.
NOT_EMPTY = "not_empty"
READABLE = "readable"
FORMAT = "format_allowed"
MODE = "mode_allowed"
WIDTH = "width_in_bounds"
HEIGHT = "height_in_bounds"
ALWAYS_BLOCKING = frozenset({NOT_EMPTY, READABLE})


# What went wrong, finer than the rule: the HTTP service answers by it (415 for what is
# not an image of an accepted format, 422 for the rest).
EMPTY, UNIDENTIFIED, BOMB, ANIMATED, CORRUPT = "empty", "unidentified", "bomb", "animated", "corrupt"


@dataclass(frozen=True)
class ImageProblem:
    rule: str  # a key of validate.severity
    kind: str  # EMPTY, UNIDENTIFIED, BOMB, ANIMATED, CORRUPT, or the rule's own name
    reason: str


@dataclass
class ImageInspection:
    """What the header said, every rule the file breaks, and the decoded image if decoded."""

    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    problems: list[ImageProblem] = field(default_factory=list)
    image: Image.Image | None = None  # fully decoded; None when a blocking rule stopped it

    @property
    def decodable(self) -> bool | None:
        """True when decoded, False when it cannot be, None when a header rule stopped it first."""
        if self.image is not None:
            return True
        if any(p.rule in ALWAYS_BLOCKING for p in self.problems):
            return False
        return None

    def rejection(self, blocking: Collection[str]) -> ImageProblem | None:
        """The first broken rule that refuses the file: unreadable, or blocking in params."""
        return next(
            (p for p in self.problems if p.rule in ALWAYS_BLOCKING or p.rule in blocking), None
        )


class ImageRejected(FanaoiError):
    """A file the pipeline refuses as an image; ``rule`` names the validate expectation."""

    def __init__(self, message: str, *, problem: ImageProblem) -> None:
        super().__init__(message)
        self.problem = problem


def blocking_rules(limits: ValidateParams) -> frozenset[str]:
    return frozenset(rule for rule, level in limits.severity.items() if level == "blocking")


def inspect_image(
    data: bytes, limits: ValidateParams, pixel_limit_key: str = "validate.max_pixels"
) -> ImageInspection:
    """Header rules, then a full decode if no blocking rule failed. Never raises on bad bytes.

    ``pixel_limit_key`` names the params key of ``limits.max_pixels`` in the bomb message
    (the service passes a tighter cap of its own).
    """
    found = ImageInspection()
    if not data:
        found.problems.append(ImageProblem(NOT_EMPTY, EMPTY, "zero-byte file"))
        return found
    bomb = f"more than {pixel_limit_key} = {limits.max_pixels:,}"
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        found.format, found.mode = image.format, image.mode
        found.width, found.height = image.size
        found.problems.extend(_header_problems(image, limits, bomb))
        if found.rejection(blocking_rules(limits)) is None:
            _decode(image, data)
            found.image = image  # not closed: closing a Pillow image frees its pixels
    except UnidentifiedImageError:
        found.problems.append(ImageProblem(
            READABLE, UNIDENTIFIED, "not an image (Pillow cannot identify its format)"
        ))
    except Image.DecompressionBombError as exc:  # Pillow's own limit, hit while reading the header
        found.problems.append(ImageProblem(
            READABLE, BOMB, f"decompression bomb: {_pixels_in(exc)}, {bomb}"
        ))
    except Exception as exc:  # any decoder failure is a property of the file, not a crash
        found.problems.append(ImageProblem(
            READABLE, CORRUPT, f"truncated or corrupt image ({_describe(exc)})"
        ))
    return found


def check_image(
    data: bytes, limits: ValidateParams, pixel_limit_key: str = "validate.max_pixels"
) -> ImageInspection:
    """``inspect_image``, raising ImageRejected with the reason when a blocking rule fails."""
    found = inspect_image(data, limits, pixel_limit_key)
    problem = found.rejection(blocking_rules(limits))
    if problem is not None:
        raise ImageRejected(problem.reason, problem=problem)
    return found


def check_file(path: Path, limits: ValidateParams) -> ImageInspection:
    """``check_image`` on a file's bytes; a file that cannot be read is rejected too."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        problem = ImageProblem(READABLE, CORRUPT, f"cannot read the file ({exc.strerror or exc})")
        raise ImageRejected(problem.reason, problem=problem) from None
    return check_image(data, limits)


def _header_problems(image: Image.Image, limits: ValidateParams, bomb: str) -> list[ImageProblem]:
    width, height = image.size
    problems = []
    if width * height > limits.max_pixels:
        problems.append(ImageProblem(
            READABLE, BOMB, f"decompression bomb: {width * height:,} pixels, {bomb}"
        ))
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        problems.append(ImageProblem(
            READABLE, ANIMATED,
            f"animated or multi-page image ({frames} frames); save one frame as a still image",
        ))
    if image.format not in limits.formats:
        problems.append(ImageProblem(FORMAT, FORMAT, format_reason(image.format, limits)))
    if image.mode not in limits.modes:
        problems.append(ImageProblem(MODE, MODE, mode_reason(image.mode, limits)))
    for rule, side, value in ((WIDTH, "width", width), (HEIGHT, "height", height)):
        if not limits.min_side <= value <= limits.max_side:
            problems.append(ImageProblem(rule, rule, side_reason(side, value, limits)))
    return problems


def format_reason(image_format: str | None, limits: ValidateParams) -> str:
    return (
        f"format {image_format} is not one of {', '.join(limits.formats)} (validate.formats); "
        f"the file's bytes decide, not its name: convert it"
    )


def mode_reason(mode: str | None, limits: ValidateParams) -> str:
    return (
        f"colour mode {mode} is not one of {', '.join(limits.modes)} (validate.modes); "
        f"convert it to 8-bit RGB or grayscale"
    )


def side_reason(side: str, pixels: int | str | None, limits: ValidateParams) -> str:
    return (
        f"{side} {pixels} px outside {limits.min_side}..{limits.max_side} "
        f"(validate.min_side/max_side)"
    )


def _decode(image: Image.Image, data: bytes) -> None:
    # verify() checks structure and checksums (PNG CRCs) but leaves its image unusable;
    # load() then decodes every pixel, which is what catches truncated JPEGs. The pixel
    # limit was checked on the header already (Pillow's global one is left alone: the
    # service checks uploads in several threads at once).
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    image.load()


def _pixels_in(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)):,} pixels" if found else "too many pixels"


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
