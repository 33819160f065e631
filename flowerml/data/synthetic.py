"""Synthetic Flowers-102 archives: the offline demo's data and the tests' data.

This module owns writing the three source files in the exact format of the official
Oxford Flowers-102 release, so that ingest reads them through the same code path as the
real download:

- ``102flowers.tgz``: a gzip-compressed tar of a ``jpg`` directory and the baseline RGB
  JPEGs ``jpg/image_00001.jpg`` ... ``jpg/image_NNNNN.jpg`` (1-based, consecutive);
- ``imagelabels.mat``: ``labels``, a 1 x N uint8 array of 1-based class labels;
- ``setid.mat``: ``trnid``, ``valid``, ``tstid``, 1 x M uint16 arrays of 1-based image ids.

One addition marks the data as synthetic wherever it travels: ``imagelabels.mat`` also holds
``flowerml_synthetic``, a text variable naming the generator and its spec. Readers of the
official format ignore variables they do not ask for, the real file has no such variable, and
ingest records its presence as ``"synthetic": true`` in the manifest (`is_synthetic`).

The images are procedurally drawn flowers. Each class has a fixed identity derived from its
label alone (petal count, petal shape, petal and centre colours, an optional inner ring),
and each image varies position, scale, rotation, background, colour and noise, so a small
CNN can learn the classes without the task being trivial. Everything is deterministic: the
same spec gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.io
from PIL import Image, ImageDraw
from scipy.special import ndtri

from flowerml.core.errors import UserError
from flowerml.core.files import write_atomically
from flowerml.data.flowers import ARCHIVE, LABELS, NUM_CLASSES, SETID, SPLIT_KEYS, image_name

# Image names have five digits, so this is the most images an archive can hold.
MAX_IMAGES = 99_999

# The longest side drawn: a 4096 px image takes about 0.5 GB and 1.5 s to draw and encode (the
# official photographs are 500 px or so), so a typo (--image-size 100000, ~30 GB for one image)
# is refused instead of meeting the OOM killer.
MAX_IMAGE_SIZE = 4096

# Share of each class that goes to train and to valid; the rest is test. The real set uses a
# fixed 10 + 10 per class, which would leave nothing to test in a small synthetic class.
SPLIT_FRACTION = 0.25

# The extra imagelabels.mat variable that says the archive is synthetic.
SYNTHETIC_MARKER = "flowerml_synthetic"

# A fixed timestamp (2009-01-01, around the dataset's release) for every tar member: a
# wall-clock mtime would make two runs with the same seed differ.
ARCHIVE_MTIME = 1_230_768_000

# scipy stamps the current time into the 116-byte MAT header; we replace it with fixed text.
_MAT_HEADER_LEN = 116
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: flowerml.data.synthetic"

# Drawing cost grows with the canvas area, so large images are drawn at most this big and
# upscaled with a smooth filter; the noise is added afterwards at full size so they still
# look like photographs rather than blown-up drawings.
_MAX_DRAW_SIDE = 200

# Streams that keep the labels, the split and each image's randomness independent, so that
# changing how one is drawn does not reshuffle the others.
_STREAM_LABELS, _STREAM_SPLIT, _STREAM_IMAGE = 1, 2, 3

# The golden-ratio step spreads successive labels' hues as far apart as possible.
_GOLDEN = (math.sqrt(5) - 1) / 2

# The standard normal's quantiles at the centres of 256 equal-probability bins.
_NORMAL_QUANTILES = ndtri((np.arange(256) + 0.5) / 256)

_PETAL_COUNTS = tuple(range(3, 13))
_PETAL_RATIOS = (0.22, 0.38, 0.55, 0.8)  # petal width / length: needle .. round

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Field names match the CLI options (``--per-class`` etc.)."""

    classes: int = 10
    per_class: int = 20
    image_size: int = 128  # longest side in pixels; the other side is 0.7..1.0 of it
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        _check_int("--classes", self.classes, 1, NUM_CLASSES)
        _check_int("--per-class", self.per_class, 3, MAX_IMAGES)
        _check_int("--image-size", self.image_size, 32, MAX_IMAGE_SIZE)
        _check_int("--seed", self.seed, 0)
        _check_int("--jpeg-quality", self.jpeg_quality, 1, 95)
        if self.num_images > MAX_IMAGES:
            raise UserError(
                f"--per-class {self.per_class} with --classes {self.classes} gives "
                f"{self.num_images} images; the archive format allows at most {MAX_IMAGES}"
            )

    @property
    def num_images(self) -> int:
        return self.classes * self.per_class


def _check_int(option: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass, but True as a class count is a caller bug worth naming.
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{option} must be an integer (got {value!r})")
    if high is None:
        if value < low:
            raise UserError(f"{option} must be at least {low} (got {value})")
    elif not low <= value <= high:
        raise UserError(f"{option} must be between {low} and {high} (got {value})")


# --------------------------------------------------------------------------- the archive


def write_synthetic_archive(out_dir: Path, spec: SyntheticSpec, *,
                            force: bool = False) -> dict[str, Path]:
    """Writes 102flowers.tgz, imagelabels.mat, setid.mat into out_dir; returns {file name: path}.

    An existing file of the three is refused (before anything is written) unless `force`.
    Each file is written to a temporary name beside it (`.tmp-*`) and renamed into place, so
    an interrupted run never leaves a truncated file under its final name; the temp file is
    removed on any failure or stop that Python sees (an error, Ctrl-C, SIGTERM).
    """
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, force)

    labels = assign_labels(spec)
    split = build_split(labels, _rng(spec.seed, _STREAM_SPLIT))
    images = _encoded_images(labels, spec)

    paths = {
        ARCHIVE: _write_atomically(out_dir / ARCHIVE, lambda f: write_tgz(f, images)),
        LABELS: _write_atomically(
            out_dir / LABELS, lambda f: f.write(mat_bytes({
                "labels": labels[np.newaxis, :], SYNTHETIC_MARKER: describe(spec)}))
        ),
        SETID: _write_atomically(
            out_dir / SETID,
            lambda f: f.write(mat_bytes({key: ids[np.newaxis, :] for key, ids in split.items()})),
        ),
    }
    return paths


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Create `out_dir`; refuse one that cannot be, or that holds an archive (unless `force`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {out_dir}: "
                        f"{error.strerror or error}") from None
    if not force:
        for name in (ARCHIVE, LABELS, SETID):
            if (out_dir / name).exists():
                raise UserError(f"{out_dir / name} already exists (--force overwrites it)")


def describe(spec: SyntheticSpec) -> str:
    """The text of the synthetic marker: what made the archive, and from which spec."""
    return (f"synthetic Flowers-102 archive drawn by flowerml.data.synthetic (classes={spec.classes}"
            f" per_class={spec.per_class} image_size={spec.image_size} seed={spec.seed}"
            f" jpeg_quality={spec.jpeg_quality}); its images are not photographs")


def is_synthetic(labels_path: Path) -> bool:
    """Whether an imagelabels.mat carries the synthetic marker (the real file does not)."""
    return any(name == SYNTHETIC_MARKER for name, _, _ in scipy.io.whosmat(labels_path))


def assign_labels(spec: SyntheticSpec) -> np.ndarray:
    """1-based labels of images 1..N, `per_class` of each class, shuffled by the seed.

    Shuffled because the real archive is not sorted by class; code that assumes it is
    should fail on synthetic data too.
    """
    labels = np.repeat(np.arange(1, spec.classes + 1, dtype=np.uint8), spec.per_class)
    return _rng(spec.seed, _STREAM_LABELS).permutation(labels)


def build_split(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The train/valid/test split of images whose 1-based labels are `labels` (image i+1 has
    labels[i]), keyed like setid.mat: ``trnid``, ``valid``, ``tstid``.

    Per class of n images: max(1, round(n * 0.25)) train, as many valid, the rest (at least
    one when n >= 3) test. Ids are 1-based and sorted ascending; every id is in exactly one
    split.
    """
    labels = np.asarray(labels).ravel()
    chosen: dict[str, list[np.ndarray]] = {key: [] for key in SPLIT_KEYS.values()}
    for label in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == label) + 1)
        n_train, n_valid = split_sizes(len(ids))
        chosen[SPLIT_KEYS["train"]].append(ids[:n_train])
        chosen[SPLIT_KEYS["valid"]].append(ids[n_train : n_train + n_valid])
        chosen[SPLIT_KEYS["test"]].append(ids[n_train + n_valid :])
    # uint16 like the original file, unless the ids do not fit in it.
    dtype = np.uint16 if labels.size <= np.iinfo(np.uint16).max else np.uint32
    return {
        key: np.sort(np.concatenate(parts or [np.empty(0, dtype=np.int64)])).astype(dtype)
        for key, parts in chosen.items()
    }


def split_sizes(n: int) -> tuple[int, int]:
    """(train, valid) image counts for a class of `n` images; the rest is test."""
    share = max(1, round(n * SPLIT_FRACTION))
    return share, share


def write_tgz(fileobj: BinaryIO, members: Iterator[tuple[str, bytes]]) -> None:
    """Streams a gzip-compressed tar of the ``jpg`` directory and `members` (name, bytes).

    Every header field that could carry the machine, user or time is fixed, including the
    gzip header's own mtime and file name, so equal input gives equal bytes.
    """
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar,
    ):
        tar.addfile(_tar_info("jpg", tarfile.DIRTYPE, 0o755, 0))
        for name, data in members:
            tar.addfile(_tar_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))


def _tar_info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = ARCHIVE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def mat_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A MATLAB 5 .mat file holding `arrays`, with a fixed header so the bytes are stable."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, arrays, format="5", oned_as="row")
    data = bytearray(buffer.getvalue())
    data[:_MAT_HEADER_LEN] = _MAT_HEADER.ljust(_MAT_HEADER_LEN, b" ")
    return bytes(data)


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write` fills an open binary file that appears at `path` whole or not at all."""

    def fill(temp: Path) -> None:
        with open(temp, "wb") as handle:
            write(handle)

    try:
        return write_atomically(path, fill)
    except OSError as error:  # a read-only or full folder: the user's to fix, not a bug
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def _encoded_images(labels: np.ndarray, spec: SyntheticSpec) -> Iterator[tuple[str, bytes]]:
    # A generator, so the archive streams: only one image is in memory at a time.
    for index, label in enumerate(labels):
        image_id = index + 1
        rng = _rng(spec.seed, _STREAM_IMAGE, image_id)
        width, height = image_dimensions(spec.image_size, rng)
        image = draw_flower(int(label), rng, width, height)
        yield f"jpg/{image_name(image_id)}", encode_jpeg(image, spec.jpeg_quality)


def write_labelled_folders(root: Path, *, classes: int, per_class: int, image_size: int,
                           seed: int) -> int:
    """`root/<NNN>/new_<i>.jpg`: freshly drawn images of classes 1..`classes`, `per_class`
    each, in class folders as `flowerml ingest --add` takes them (new labelled photographs
    arriving, for the demos). Returns how many it wrote."""
    for label in range(1, classes + 1):
        folder = root / f"{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            rng = _rng(seed, _STREAM_IMAGE, label, index)
            width, height = image_dimensions(image_size, rng)
            write_atomically(folder / f"new_{index}.jpg",
                             encode_jpeg(draw_flower(label, rng, width, height), 90))
    return classes * per_class


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    # One generator per (seed, stream, image): independent of generation order, so an image's
    # pixels depend only on the seed and its id.
    return np.random.default_rng([seed, stream, *keys])


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


# --------------------------------------------------------------------------- the drawing


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
