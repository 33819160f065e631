"""The decode cache: a synced split decoded once into one uint8 memmap at a model's resize.

`build_decoded_split` decodes every JPEG of a split (short side resized to R, the square
around the centre crop S kept) into
`<root>/decoded/<split>-<R>px-crop<S>[-bicubic]-<manifest>-v<format>.npy`, [N, R, R, 3] uint8,
plus the labels and a meta file written last; every epoch and every later run of the same
version maps that file instead of decoding the full-size originals again. R, S and the filter
are the model's `Preprocessing`: `default_preprocessing` (224 -> 256, the tutorial's
Resize(256) + CenterCrop(224)) for a model without weights of its own, 232 for ResNet-152's
IMAGENET1K_V2 weights; each combination is its own file.

The decode runs on every core by default. Pillow releases the GIL only while it decodes and
resizes (~93% of an image's time: two threads decode 1.87x as fast as one on two cores), so
threads stop scaling on many cores (Amdahl: ~8x on 16 at best); with
`PROCESS_MIN_WORKERS` or more workers and enough images (and where processes can be forked)
the work goes to worker processes, each writing its images straight into the shared
memory-mapped file.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from flowerml.core.errors import DataError
from flowerml.core.files import file_lock, write_atomically
from flowerml.core.progress import NullProgress, Progress
from flowerml.data.manifest import PublishedDataset, check_split
from flowerml.data.preprocessing import FILTERS, Preprocessing
from flowerml.data.sync import parallel_map, require_synced

# Bumped whenever the decoded cache's content would change for the same input (a different
# filter, layout or crop), so stale caches are rebuilt rather than silently reused. 2: the
# square placed by torchvision's geometry (`Preprocessing.crop_box`), the crop in the name.
DECODE_FORMAT = 2

# Processes instead of threads from this many workers on (below it threads do as well: 2
# threads and 2 processes both decode ~640 images/s on two cores), and only when each process
# gets enough images to repay its start.
PROCESS_MIN_WORKERS = 4
PROCESS_MIN_IMAGES_PER_WORKER = 64
# Images per task handed to a process: few enough round trips, an even spread at the end.
PROCESS_CHUNK = 32


def as_square(square: Preprocessing | int) -> Preprocessing:
    """A side R alone is the centre R x R of the short side resized to R."""
    return square if isinstance(square, Preprocessing) else Preprocessing(square, square)


def decode_square(path: Path, square: Preprocessing | int) -> np.ndarray:
    """[R, R, 3] uint8: the short side resized to R (`square.resize`), the R x R square
    around the centre crop kept, so that CenterCrop(`square.crop`) of it gives torchvision's
    Resize(R) + CenterCrop(crop) pixels (`Preprocessing.crop_box`).

    One Pillow call does both: `resize(box=...)` filters that square straight to R x R.
    `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves the short
    side at least R, which skips most of the IDCT work.
    """
    square = as_square(square)
    resolution = square.resize
    try:
        with Image.open(path) as image:
            width, height = image.size
            scale = resolution / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: does not decode: {error}") from None
    box = square.crop_box(*rgb.size, side=resolution)
    return np.asarray(rgb.resize((resolution, resolution), FILTERS[square.interpolation],
                                 box=box))


class DecodedSplit:
    """A split decoded to uint8 [N, R, R, 3] (memory-mapped .npy) and its 0-based labels.

    Pickles as its path, so DataLoader workers started by spawn or forkserver map the same
    file instead of receiving a copy of every image.
    """

    def __init__(self, path: Path, labels: np.ndarray, *, decoded: int = 0) -> None:
        self.path = Path(path)
        self.labels = labels
        self.decoded = decoded  # images decoded by the call that returned this (0: reused)
        self.images = self._open()

    def _open(self) -> np.ndarray:
        # Copy-on-write: torch.from_numpy wants a writable array, and no write reaches the file.
        return np.load(self.path, mmap_mode="c")

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {"path": self.path, "labels": self.labels, "decoded": self.decoded}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = self._open()


def decoded_paths(root: Path, published: PublishedDataset, split: str,
                  square: Preprocessing) -> tuple[Path, Path, Path]:
    """(images .npy, labels .npy, meta .json), named by split, resolution, crop, filter (when
    not bilinear) and manifest."""
    fil = "" if square.interpolation == "bilinear" else f"-{square.interpolation}"
    stem = (f"{split}-{square.resize}px-crop{square.crop}{fil}-"
            f"{published.manifest_sha256[:16]}-v{DECODE_FORMAT}")
    folder = root / "decoded"
    return folder / f"{stem}.npy", folder / f"{stem}.labels.npy", folder / f"{stem}.json"


def decoded_meta(published: PublishedDataset, split: str, square: Preprocessing,
                 count: int) -> dict:
    return {"split": split, "resolution": square.resize, "crop": square.crop,
            "interpolation": square.interpolation, "count": count, "layout": "NHWC",
            "manifest_sha256": published.manifest_sha256, "format": DECODE_FORMAT}


def open_decoded(paths: tuple[Path, Path, Path], meta: dict) -> DecodedSplit | None:
    """The cache when it is complete and for exactly this input; None otherwise."""
    images, labels, meta_path = paths
    try:
        if json.loads(meta_path.read_text()) != meta:
            return None
        decoded = DecodedSplit(images, np.load(labels))
    except (OSError, ValueError):
        return None
    resolution, count = meta["resolution"], meta["count"]
    if decoded.images.shape != (count, resolution, resolution, 3) or len(decoded) != count:
        return None
    return decoded


def build_decoded_split(root: Path, published: PublishedDataset, split: str,
                        square: Preprocessing | int, *, workers: int | None = None,
                        progress: Progress | None = None) -> DecodedSplit:
    """The split decoded as `square` says (a model's `Preprocessing`: its resize, crop and
    filter; or a side R alone, the centre R x R), built on first use (the split must be
    synced), on `workers` threads or processes (default: one per CPU core)."""
    check_split(split)
    if isinstance(square, int) and square < 1:
        raise DataError(f"resolution must be positive: got {square}")
    square = as_square(square)
    entries = published.split_files(split)
    if not entries:
        raise DataError(f"split '{split}' of {published.dataset}@{published.version} "
                        "has no images")
    paths = decoded_paths(Path(root), published, split, square)
    meta = decoded_meta(published, split, square, len(entries))
    with file_lock(paths[0].with_suffix(".lock")):
        existing = open_decoded(paths, meta)
        if existing is not None:
            return existing
        files = [Path(root) / e.key for e in entries]
        require_synced(files)
        labels = np.array([e.label - 1 for e in entries], dtype=np.int64)
        decode_into(paths[0], files, square, workers, progress or NullProgress())
        write_npy_atomically(paths[1], labels)
        # The meta file is the pointer: written last, so a cache is used only when complete.
        write_atomically(paths[2], json.dumps(meta, sort_keys=True).encode())
    return DecodedSplit(paths[0], labels, decoded=len(files))


def decode_into(path: Path, files: list[Path], square: Preprocessing, workers: int | None,
                progress: Progress) -> None:
    """Decode `files` into a new .npy at `path`, which appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8,
                                          shape=(len(files), square.resize, square.resize, 3))
        progress.start("decoding images", len(files))
        workers = decode_workers(workers, len(files))
        if use_processes(workers, len(files)):
            array.flush()  # the header and size on disk before the processes map the file
            fill_in_processes(temp, files, square, workers, progress)
        else:
            fill(array, files, square, workers, progress)
        array.flush()
        del array  # unmapped before the rename
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def decode_workers(workers: int | None, count: int) -> int:
    return max(1, min(workers or os.cpu_count() or 1, count))


def use_processes(workers: int, count: int) -> bool:
    return (workers >= PROCESS_MIN_WORKERS and count >= PROCESS_MIN_IMAGES_PER_WORKER * workers
            and "fork" in multiprocessing.get_all_start_methods())


def fill(array: np.ndarray, files: list[Path], square: Preprocessing, workers: int | None,
         progress: Progress) -> None:
    """array[i] = files[i] decoded, on threads (Pillow releases the GIL to decode and resize)."""

    def decode(index: int) -> None:
        array[index] = decode_square(files[index], square)

    for _ in parallel_map(decode, range(len(files)), workers):
        progress.advance()


def fill_in_processes(path: Path, files: list[Path], square: Preprocessing, workers: int,
                      progress: Progress) -> None:
    """The .npy at `path` filled with `files` decoded, by `workers` processes that each map
    the file and write their images in place (nothing is pickled back but a count).
    Forked, as the DataLoader's workers are: a spawned process would re-import the program's
    main module (and run a script that has no main guard again), and pay for fresh imports;
    a forked one only decodes, so it never takes the locks other threads may have held."""
    tasks = [(start, [str(f) for f in files[start:start + PROCESS_CHUNK]], square)
             for start in range(0, len(files), PROCESS_CHUNK)]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_map_target, initargs=(str(path),))
    try:
        for done in pool.map(_decode_range, tasks):
            progress.advance(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed image stops the rest


_target: np.ndarray | None = None  # a decode process's view of the file it fills


def _map_target(path: str) -> None:
    global _target
    _target = np.load(path, mmap_mode="r+")


def _decode_range(task: tuple[int, list[str], Preprocessing]) -> int:
    start, paths, square = task
    assert _target is not None
    for offset, name in enumerate(paths):
        # A shared mapping: the parent sees these pages, and flushes them once at the end.
        _target[start + offset] = decode_square(Path(name), square)
    return len(paths)


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    def save(temp: Path) -> None:
        with open(temp, "wb") as handle:  # a handle: np.save would add .npy to a bare name
            np.save(handle, array)

    write_atomically(path, save)
