"""Drawing a synthetic flower photograph: each class a fixed identity derived from its label
alone (petal count, petal shape, petal and centre colours, an optional inner ring), each image
varying position, scale, rotation, background, colour and noise, so that a small CNN can learn
the classes without the task being trivial; and the baseline JPEG it is stored as.
`flowerml.data.synthetic` writes archives and class folders of them.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.special import ndtri

# Drawing cost grows with the canvas area, so large images are drawn at most this big and
# upscaled with a smooth filter; the noise is added afterwards at full size so they still
# look like photographs rather than blown-up drawings.
_MAX_DRAW_SIDE = 200

# The golden-ratio step spreads successive labels' hues as far apart as possible.
_GOLDEN = (math.sqrt(5) - 1) / 2

# The standard normal's quantiles at the centres of 256 equal-probability bins.
_NORMAL_QUANTILES = ndtri((np.arange(256) + 0.5) / 256)

_PETAL_COUNTS = tuple(range(3, 13))
_PETAL_RATIOS = (0.22, 0.38, 0.55, 0.8)  # petal width / length: needle .. round

Colour = tuple[int, int, int]


def image_dimensions(size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) with the long side `size` and the short side 0.7..1.0 of it, landscape
    or portrait, the way the real photographs vary."""
    short = max(1, round(size * rng.uniform(0.7, 1.0)))
    return (size, short) if rng.random() < 0.6 else (short, size)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline (non-progressive) RGB JPEG bytes of `image`."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, progressive=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class FlowerStyle:
    """What makes a class recognisable; fixed per label, independent of the seed."""

    petals: int
    petal_ratio: float  # petal width / length
    petal_hue: float
    petal_saturation: float
    centre_hue: float
    centre_size: float  # centre radius / flower radius
    inner_ring: bool


def flower_style(label: int) -> FlowerStyle:
    """The identity of class `label`. Discrete traits cycle with different periods so that
    neighbouring labels differ in several traits at once, and hues follow the golden ratio
    so that no two of the first hundred classes share a colour."""
    i = label - 1
    petal_hue = (i * _GOLDEN) % 1.0
    return FlowerStyle(
        petals=_PETAL_COUNTS[i % len(_PETAL_COUNTS)],
        petal_ratio=_PETAL_RATIOS[(i * 3 + i // 10) % len(_PETAL_RATIOS)],
        petal_hue=petal_hue,
        petal_saturation=0.55 + 0.4 * ((i * 7) % 5) / 4,
        # A third to two thirds of the wheel away, so the centre never blends into the petals.
        centre_hue=(petal_hue + 0.33 + 0.33 * ((i * 5) % 7) / 6) % 1.0,
        centre_size=0.15 + 0.1 * ((i // 3) % 3),
        inner_ring=(i // 5) % 2 == 1,
    )


def draw_flower(label: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB photograph-like image, `width` x `height`, of one or two flowers of class
    `label` on a varied background; `rng` decides everything that varies between images."""
    style = flower_style(label)
    scale = min(1.0, _MAX_DRAW_SIDE / max(width, height))
    draw_w, draw_h = max(1, round(width * scale)), max(1, round(height * scale))

    canvas = Image.fromarray(_background(rng, draw_w, draw_h))
    draw = ImageDraw.Draw(canvas)
    _draw_leaves(draw, rng, draw_w, draw_h)

    short = min(draw_w, draw_h)
    radius = short * rng.uniform(0.28, 0.45)
    centre = (
        rng.uniform(radius * 0.6, draw_w - radius * 0.6),
        rng.uniform(radius * 0.6, draw_h - radius * 0.6),
    )
    jitter = _colour_jitter(rng)
    if rng.random() < 0.35:
        # A smaller second flower, drawn first so the main one overlaps it.
        small = radius * rng.uniform(0.35, 0.55)
        other = (rng.uniform(small, draw_w - small), rng.uniform(small, draw_h - small))
        _draw_one_flower(draw, style, rng, other, small, jitter)
    _draw_one_flower(draw, style, rng, centre, radius, jitter)

    if canvas.size != (width, height):
        canvas = canvas.resize((width, height), Image.Resampling.BICUBIC)
    return Image.fromarray(_add_noise(np.asarray(canvas), rng))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # A linear gradient between two muted foliage/sky/soil colours, in a random direction.
    start, end = (
        np.array(
            _hsv(rng.uniform(0.05, 0.6), rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.75)),
            dtype=np.float32,
        )
        for _ in range(2)
    )
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs / max(width, 1) * math.cos(angle) + ys / max(height, 1) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = start + (end - start) * t[..., np.newaxis]
    return pixels.clip(0, 255).astype(np.uint8)


def _draw_leaves(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> None:
    # Green clutter behind the flower, so the classifier cannot rely on a plain background.
    for _ in range(rng.integers(0, 5)):
        length = min(width, height) * rng.uniform(0.15, 0.4)
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        colour = _hsv(rng.uniform(0.22, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        draw.polygon(
            _ellipse_points(
                centre, length, length * rng.uniform(0.2, 0.4), rng.uniform(0, 2 * math.pi)
            ),
            fill=colour,
        )


def _colour_jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    """(hue shift, saturation factor, value) for one image: small enough that the class's
    colour stays far from its neighbours', large enough that no two images match."""
    return rng.uniform(-0.025, 0.025), rng.uniform(0.85, 1.1), rng.uniform(0.75, 1.0)


def _draw_one_flower(
    draw: ImageDraw.ImageDraw,
    style: FlowerStyle,
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    jitter: tuple[float, float, float],
) -> None:
    hue_shift, sat_factor, value = jitter
    petal_sat = min(1.0, style.petal_saturation * sat_factor)
    petal = _hsv(style.petal_hue + hue_shift, petal_sat, value)
    edge = _hsv(style.petal_hue + hue_shift, min(1.0, petal_sat + 0.2), value * 0.6)
    rotation = rng.uniform(0, 2 * math.pi)
    core = radius * style.centre_size

    _draw_ring(draw, centre, style.petals, rotation, core, radius, style.petal_ratio, petal, edge)
    if style.inner_ring:
        # Offset by half a petal so the inner petals show between the outer ones.
        inner = _hsv(style.petal_hue + hue_shift, petal_sat * 0.45, min(1.0, value + 0.15))
        _draw_ring(
            draw,
            centre,
            style.petals,
            rotation + math.pi / style.petals,
            core,
            radius * 0.6,
            style.petal_ratio,
            inner,
            edge,
        )

    centre_colour = _hsv(style.centre_hue + hue_shift, 0.85, value * 0.85)
    x, y = centre
    draw.ellipse((x - core, y - core, x + core, y + core), fill=centre_colour)


def _draw_ring(draw, centre, count, rotation, inner_radius, outer_radius, ratio, fill, edge):
    length = max(outer_radius - inner_radius * 0.5, 1.0)
    half_length = length / 2
    for k in range(count):
        angle = rotation + 2 * math.pi * k / count
        # Petals start just inside the centre disc and reach out to the flower's radius.
        reach = inner_radius * 0.5 + half_length
        petal_centre = (centre[0] + reach * math.cos(angle), centre[1] + reach * math.sin(angle))
        draw.polygon(
            _ellipse_points(petal_centre, half_length, half_length * ratio, angle),
            fill=fill,
            outline=edge,
        )


def _ellipse_points(centre, semi_major, semi_minor, angle, steps: int = 20):
    # ImageDraw.ellipse cannot rotate, so petals are drawn as rotated polygons.
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        ex, ey = semi_major * math.cos(t), semi_minor * math.sin(t)
        points.append((centre[0] + ex * cos_a - ey * sin_a, centre[1] + ex * sin_a + ey * cos_a))
    return points


def _add_noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Sensor-like Gaussian noise, different per image, so no two images are pixel-identical.
    # Drawn as random bytes mapped through the normal quantiles: the same distribution at
    # integer precision, about three times faster than standard_normal at 500 px.
    levels = np.round(_NORMAL_QUANTILES * rng.uniform(3.0, 9.0)).astype(np.int16)
    indices = np.frombuffer(rng.bytes(pixels.size), dtype=np.uint8).reshape(pixels.shape)
    noisy = pixels.astype(np.int16)
    noisy += levels[indices]
    return noisy.clip(0, 255).astype(np.uint8)


def _hsv(hue: float, saturation: float, value: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(
        hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0)
    )
    return round(r * 255), round(g * 255), round(b * 255)
