"""Seeded synthetic GO/NG images of cooling fans, seen from above, for demos and tests.

A fan is a square housing with a round opening, a rotor of N blades around a hub and a
label sticker on the hub, under varying pose, lighting, blur and sensor noise. A GO fan is
intact; an NG fan carries exactly one defect of ``DEFECT_KINDS``.

Every image is a pure function of (seed, class, index): its random numbers come from its
own generator, so an image never depends on how many others are drawn or in what order,
and the same seed writes the same bytes (PNG without metadata).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.errors import FanaoiError

log = logging.getLogger(__name__)

DEFECT_KINDS = (
    "missing_blade",
    "chipped_blade",
    "missing_label",
    "offset_label",
    "scratch",
    "stain",
)
SUPERSAMPLE = 2  # drawn at twice the size, then box-averaged: smooth edges at no extra cost
_LABEL_COLOURS = ((232, 232, 226), (196, 200, 206), (228, 204, 70), (150, 192, 232), (236, 150, 60))
# Relative to the blade colour, so a stain always stands out: oil, rust, yellowed plastic.
_STAIN_TINTS = ((110, 30, -40), (120, 100, -10), (60, -10, -60))

RGB = tuple[int, int, int]
Point = tuple[float, float]


class DemoDataError(FanaoiError):
    """Demo data cannot be written as asked; the message names the folder or value and the fix."""


@dataclass(frozen=True)
class Fan:
    """Everything random about one fan and its photo, in supersampled pixels."""

    size: int
    centre: Point
    frame_side: float
    frame_angle: float
    background: RGB
    frame_shade: int
    blade_shade: int
    hub_shade: int
    blade_count: int
    rotor_angle: float
    blade_sweep: float
    blade_fill: float
    hub_ratio: float
    label_colour: RGB
    label_ratio: float
    label_shift: Point
    dust: tuple[tuple[float, float, int], ...]
    gain: float
    contrast: float
    gradient: float
    gradient_angle: float
    white_balance: tuple[float, float, float]
    blur: float
    noise: float
    noise_seed: int

    @property
    def open_radius(self) -> float:
        return 0.47 * self.frame_side

    @property
    def blade_radius(self) -> float:
        return 0.94 * self.open_radius

    @property
    def hub_radius(self) -> float:
        return self.hub_ratio * self.open_radius


@dataclass(frozen=True)
class Defect:
    """One NG defect; which fields matter depends on ``kind``."""

    kind: str
    blade: int = 0
    cut: tuple[float, float] = (1.0, 1.0)  # chipped blade: blade length kept at each edge
    label_shift: Point = (0.0, 0.0)
    path: tuple[Point, ...] = ()  # scratch polyline or stain blob centres (supersampled px)
    width: float = 0.0  # scratch width or stain blob radius (supersampled px)
    colour: RGB = (0, 0, 0)
    opacity: float = 1.0


def sample_fan(rng: np.random.Generator, size: int) -> Fan:
    """Draw the pose, build, colours and photo conditions of one fan."""
    canvas = size * SUPERSAMPLE
    background = int(rng.uniform(120, 175))
    tint = rng.uniform(-8, 8, 3)
    frame_shade = int(rng.uniform(28, 70))
    blade_shade = int(frame_shade + rng.uniform(40, 70))
    hub_ratio = rng.uniform(0.30, 0.37)
    return Fan(
        size=size,
        centre=tuple(canvas / 2 + rng.uniform(-0.02, 0.02, 2) * canvas),
        frame_side=canvas * rng.uniform(0.9, 0.95),
        frame_angle=rng.uniform(-0.12, 0.12),
        background=tuple(int(np.clip(background + t, 0, 255)) for t in tint),
        frame_shade=frame_shade,
        blade_shade=blade_shade,
        hub_shade=int(blade_shade + rng.uniform(-12, 12)),
        blade_count=int(rng.integers(5, 10)),
        rotor_angle=rng.uniform(0, 2 * math.pi),
        blade_sweep=rng.uniform(0.25, 0.6),
        blade_fill=rng.uniform(0.68, 0.8),
        hub_ratio=hub_ratio,
        label_colour=_LABEL_COLOURS[int(rng.integers(len(_LABEL_COLOURS)))],
        label_ratio=rng.uniform(0.72, 0.84),
        label_shift=tuple(rng.uniform(-0.05, 0.05, 2)),
        dust=tuple(
            (*rng.uniform(0.1, 0.9, 2) * canvas, int(rng.choice((-1, 1))))
            for _ in range(int(rng.integers(0, 4)))
        ),
        gain=rng.uniform(0.88, 1.12),
        contrast=rng.uniform(0.9, 1.1),
        gradient=rng.uniform(0.0, 0.15),
        gradient_angle=rng.uniform(0, 2 * math.pi),
        white_balance=tuple(rng.uniform(0.96, 1.04, 3)),
        blur=rng.uniform(0.3, 0.6),
        noise=rng.uniform(1.5, 4.0),
        noise_seed=int(rng.integers(2**32)),
    )


def sample_defect(rng: np.random.Generator, kind: str, fan: Fan) -> Defect:
    """Draw the size, place and look of one defect of ``kind`` on ``fan``."""
    blade = int(rng.integers(fan.blade_count))
    if kind in ("missing_blade", "missing_label"):
        return Defect(kind, blade=blade)
    if kind == "chipped_blade":
        cut = (rng.uniform(0.1, 0.3), rng.uniform(0.45, 0.65))
        return Defect(kind, blade=blade, cut=cut if rng.random() < 0.5 else cut[::-1])
    if kind == "offset_label":
        angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.7)
        return Defect(kind, label_shift=(distance * math.cos(angle), distance * math.sin(angle)))
    if kind == "scratch":
        return _sample_scratch(rng, fan)
    if kind == "stain":
        return _sample_stain(rng, fan, blade)
    raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")


def _sample_scratch(rng: np.random.Generator, fan: Fan) -> Defect:
    """A slightly bent bright line across blades and hub, like a tool slip over the rotor."""
    angle = rng.uniform(0, 2 * math.pi)
    across = angle + math.pi / 2
    nearest = _polar(fan.centre, fan.blade_radius * rng.uniform(-0.45, 0.45), across)
    half = fan.blade_radius * rng.uniform(0.55, 0.8)
    bent = _polar(nearest, rng.uniform(-0.12, 0.12) * half, across)
    path = (_polar(nearest, -half, angle), bent, _polar(nearest, half, angle))
    width = SUPERSAMPLE * fan.size / 96 * rng.uniform(2.5, 3.2)
    shade = int(rng.uniform(210, 245))
    return Defect("scratch", path=path, width=width, colour=(shade,) * 3, opacity=rng.uniform(0.9, 1.0))


def _sample_stain(rng: np.random.Generator, fan: Fan, blade: int) -> Defect:
    """An irregular blob of oil (dark) or discolouration (rust, yellowed plastic) on the rotor."""
    on_hub = rng.random() < 0.3
    if on_hub:
        centre = _polar(fan.centre, fan.hub_radius * rng.uniform(0, 0.6), rng.uniform(0, 2 * math.pi))
    else:
        centre = _blade_point(fan, blade, rng.uniform(0.35, 0.8), 0.5)
    radius = fan.size * SUPERSAMPLE * rng.uniform(0.09, 0.12)
    blobs = tuple(
        (centre[0] + dx, centre[1] + dy) for dx, dy in rng.normal(0, radius * 0.45, (4, 2))
    )
    tint = _STAIN_TINTS[int(rng.integers(len(_STAIN_TINTS)))]
    colour = tuple(int(np.clip(fan.blade_shade + t, 0, 255)) for t in tint)
    return Defect("stain", path=blobs, width=radius, colour=colour, opacity=rng.uniform(0.9, 1.0))


def render_fan(fan: Fan, defect: Defect | None = None) -> Image.Image:
    """The photo of ``fan`` (with ``defect``, if any) as an RGB image of fan.size pixels."""
    canvas = fan.size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), fan.background)
    draw = ImageDraw.Draw(image)
    _draw_housing(draw, fan)
    _draw_rotor(draw, fan, defect)
    if defect is not None and defect.kind in ("scratch", "stain"):
        image = _paint_mark(image, defect)
    _draw_dust(ImageDraw.Draw(image), fan)
    return _photograph(image.reduce(SUPERSAMPLE), fan)


def _draw_housing(draw: ImageDraw.ImageDraw, fan: Fan) -> None:
    """Square plastic frame with rounded corners, screw holes, a dark opening and struts."""
    half = fan.frame_side / 2
    draw.polygon(_rounded_square(fan.centre, half, fan.frame_angle), fill=(fan.frame_shade,) * 3)
    for corner in range(4):
        angle = fan.frame_angle + math.pi / 4 + corner * math.pi / 2
        _disc(draw, _polar(fan.centre, half * 1.16, angle), half * 0.09, fan.background)
    depth = (fan.frame_shade // 3,) * 3
    _disc(draw, fan.centre, fan.open_radius, depth)
    for strut in range(4):
        end = _polar(fan.centre, fan.open_radius, fan.frame_angle + math.pi / 4 + strut * math.pi / 2)
        draw.line((fan.centre, end), fill=(fan.frame_shade,) * 3, width=round(fan.frame_side * 0.03))


def _draw_rotor(draw: ImageDraw.ImageDraw, fan: Fan, defect: Defect | None) -> None:
    kind = defect.kind if defect else None
    for blade in range(fan.blade_count):
        if kind == "missing_blade" and blade == defect.blade:
            continue
        cut = defect.cut if kind == "chipped_blade" and blade == defect.blade else (1.0, 1.0)
        shade = fan.blade_shade + (blade % 2) * 4  # moulding differs slightly blade to blade
        draw.polygon(_blade_outline(fan, blade, cut), fill=(shade,) * 3)
    _disc(draw, fan.centre, fan.hub_radius, (fan.hub_shade,) * 3)
    _disc(draw, fan.centre, fan.hub_radius * 0.93, (min(255, fan.hub_shade + 8),) * 3)
    if kind != "missing_label":
        shift = defect.label_shift if kind == "offset_label" else fan.label_shift
        _draw_label(draw, fan, shift)


def _draw_label(draw: ImageDraw.ImageDraw, fan: Fan, shift: Point) -> None:
    """Round sticker with a printed ring and two lines of text, turning with the rotor."""
    centre = (fan.centre[0] + shift[0] * fan.hub_radius, fan.centre[1] + shift[1] * fan.hub_radius)
    radius = fan.label_ratio * fan.hub_radius
    _disc(draw, centre, radius, fan.label_colour)
    ink = tuple(c // 4 for c in fan.label_colour)
    box = (centre[0] - radius * 0.8, centre[1] - radius * 0.8, centre[0] + radius * 0.8, centre[1] + radius * 0.8)
    draw.ellipse(box, outline=ink, width=max(1, round(radius * 0.08)))
    for offset, length in ((-0.22, 0.5), (0.22, 0.35)):
        middle = _polar(centre, offset * radius, fan.rotor_angle + math.pi / 2)
        ends = [_polar(middle, sign * length * radius, fan.rotor_angle) for sign in (-1, 1)]
        draw.line(ends, fill=ink, width=max(1, round(radius * 0.12)))


def _draw_dust(draw: ImageDraw.ImageDraw, fan: Fan) -> None:
    """A few specks of dust on every part: small enough that no one would reject for them."""
    for x, y, sign in fan.dust:
        shade = max(0, min(255, fan.blade_shade + sign * 60))
        _disc(draw, (x, y), SUPERSAMPLE * 0.6, (shade,) * 3)


def _paint_mark(image: Image.Image, defect: Defect) -> Image.Image:
    """Blend a scratch or stain onto the image through a soft-edged mask."""
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    alpha = round(255 * defect.opacity)
    if defect.kind == "scratch":
        draw.line(defect.path, fill=alpha, width=max(1, round(defect.width)), joint="curve")
    else:
        for centre in defect.path:
            _disc(draw, centre, defect.width * 0.7, alpha)
        mask = mask.filter(ImageFilter.GaussianBlur(defect.width * 0.25))
    return Image.composite(Image.new("RGB", image.size, defect.colour), image, mask)


def _photograph(image: Image.Image, fan: Fan) -> Image.Image:
    """Camera and lighting: contrast, gain with a light gradient, white balance, lens blur,
    sensor noise."""
    size = fan.size
    ramp = (np.arange(size, dtype=np.float32) - size / 2) / size
    light = fan.gain * (
        1 + fan.gradient * (
            math.cos(fan.gradient_angle) * ramp[None, :] + math.sin(fan.gradient_angle) * ramp[:, None]
        )
    )
    pixels = (np.asarray(image, dtype=np.float32) - 127.5) * fan.contrast + 127.5
    pixels *= light[..., None] * np.asarray(fan.white_balance, dtype=np.float32)
    pixels = _blur(pixels, fan.blur)
    noise = np.random.default_rng(fan.noise_seed).standard_normal(pixels.shape, dtype=np.float32)
    pixels += noise * np.float32(fan.noise)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3-tap Gaussian: enough for the slight defocus of a fixed-focus camera."""
    side = math.exp(-1 / (2 * sigma**2))
    edge, centre = side / (1 + 2 * side), 1 / (1 + 2 * side)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = edge * (padded[:-2] + padded[2:]) + centre * padded[1:-1]
    return edge * (rows[:, :-2] + rows[:, 2:]) + centre * rows[:, 1:-1]


_OUTLINE_ALONG = np.concatenate([np.linspace(0, 1, 9), np.ones(7), np.linspace(1, 0, 9)])
_OUTLINE_ACROSS = np.concatenate([np.zeros(9), np.linspace(0, 1, 9)[1:-1], np.ones(9)])


def _blade_polar(
    fan: Fan, blade: int, along: np.ndarray, across: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of blade points: ``along`` root (0) to tip (1), ``across`` leading
    (0) to trailing (1) edge. Blades widen and sweep back towards the tip."""
    root = fan.hub_radius * 0.9
    radius = root + along * (fan.blade_radius - root)
    pitch = 2 * math.pi / fan.blade_count
    width = pitch * fan.blade_fill * (0.55 + 0.45 * along)
    angle = fan.rotor_angle + blade * pitch + fan.blade_sweep * along**1.3 + across * width
    return radius, angle


def _blade_point(fan: Fan, blade: int, along: float, across: float) -> Point:
    radius, angle = _blade_polar(fan, blade, np.float64(along), np.float64(across))
    return _polar(fan.centre, float(radius), float(angle))


def _blade_outline(fan: Fan, blade: int, cut: tuple[float, float]) -> list[Point]:
    """Leading edge root to tip, along the tip, trailing edge back; ``cut`` chips the tip.

    ``cut`` is the share of the blade length kept at the leading and trailing edge; the
    tip is replaced by the straight break between them.
    """
    kept = cut[0] + (cut[1] - cut[0]) * _OUTLINE_ACROSS
    radius, angle = _blade_polar(fan, blade, np.minimum(_OUTLINE_ALONG, kept), _OUTLINE_ACROSS)
    xs = fan.centre[0] + radius * np.cos(angle)
    ys = fan.centre[1] + radius * np.sin(angle)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _rounded_square(centre: Point, half: float, angle: float) -> list[Point]:
    """A superellipse: a square with rounded corners, rotated by ``angle``."""
    points = []
    for t in np.linspace(0, 2 * math.pi, 48, endpoint=False):
        c, s = math.cos(t), math.sin(t)
        x = half * math.copysign(abs(c) ** (2 / 8), c)
        y = half * math.copysign(abs(s) ** (2 / 8), s)
        points.append((
            centre[0] + x * math.cos(angle) - y * math.sin(angle),
            centre[1] + x * math.sin(angle) + y * math.cos(angle),
        ))
    return points


def _polar(origin: Point, radius: float, angle: float) -> Point:
    return (origin[0] + radius * math.cos(angle), origin[1] + radius * math.sin(angle))


def _disc(draw: ImageDraw.ImageDraw, centre: Point, radius: float, fill: RGB | int) -> None:
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)


def draw_demo_image(seed: int, label: int, index: int, size: int) -> tuple[Image.Image, str | None]:
    """Image ``index`` of class ``label`` (1 = defect) and its defect kind; pure in its arguments.

    NG images cycle through the defect kinds, so every kind is equally common.
    """
    rng = np.random.default_rng([seed, label, index])
    fan = sample_fan(rng, size)
    if label == 0:
        return render_fan(fan), None
    kind = DEFECT_KINDS[index % len(DEFECT_KINDS)]
    return render_fan(fan, sample_defect(rng, kind, fan)), kind


