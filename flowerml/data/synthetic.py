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

The images are procedurally drawn flowers (`flowerml.data.flower_drawing`). Everything is
deterministic: the same spec gives byte-identical files. `write_labelled_folders` draws new
images of the same classes into class folders, as `flowerml ingest --add` takes them.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.io

from flowerml.core.errors import UserError
from flowerml.core.files import write_atomically
from flowerml.data.flower_drawing import draw_flower, encode_jpeg, image_dimensions
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

# Streams that keep the labels, the split and each image's randomness independent, so that
# changing how one is drawn does not reshuffle the others.
_STREAM_LABELS, _STREAM_SPLIT, _STREAM_IMAGE = 1, 2, 3

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
