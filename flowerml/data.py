"""Data: a published split on local disk, verified, decoded once, and fed to PyTorch.

This module owns everything between a version on the store and a batch on the device:

- `resolve_dataset`: which version to use (CURRENT or an explicit one) and its manifest,
  checked against the sha256 that CURRENT records.
- `sync_split`: the split's JPEGs in `<cache>/<dataset>/<version>/<split>/<NNN>/`, each file's
  sha256 checked against the manifest, downloading in parallel only what is missing or
  different. A per-split stamp remembers which files were verified (by size, mtime and ctime),
  so a second sync of a complete split stats the files instead of re-hashing them.
- `build_decoded_split`: every JPEG decoded once into one uint8 array on disk (memory-mapped),
  at the working resolution, reused by every epoch and every later run of the same version.
- the datasets, the three transform presets (`standard`, `tutorial`, `none`), `prepare_batch`
  (uint8 -> normalised float on the device) and the loaders.

The `standard` preset reads the decoded cache, so an epoch costs a crop, a flip and a colour
jitter on small uint8 tensors instead of a JPEG decode of the full-size original. `tutorial`
reproduces the original notebook's PIL pipeline on the full-size files, for comparison.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from flowerml import flowers
from flowerml.errors import DatasetNotFound, UserError
from flowerml.ingest import CURRENT, MANIFEST, dataset_prefix, version_prefix
from flowerml.progress import NullProgress, Progress
from flowerml.storage import ObjectNotFound, Store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("standard", "tutorial", "none")
SPLITS = flowers.SPLITS

# The classic ImageNet ratio: resize the short side to 256 for a 224 crop. The decoded cache is
# stored at this resolution, so eval's centre crop sees the tutorial's Resize(256) geometry.
RESIZE_RATIO = 256 / 224

# Bumped whenever the decoded cache's content would change for the same input (a different
# filter, layout or crop), so stale caches are rebuilt rather than silently reused.
DECODE_FORMAT = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_LISTED = 5


class DataError(UserError):
    """A bad preset or split, a manifest that does not check out, or files that do not match."""


# --------------------------------------------------------------------------------------------
# The published version


@dataclass(frozen=True)
class PublishedDataset:
    """One published version: its identity, class names and the manifest's file entries."""

    dataset: str
    version: str
    manifest_sha256: str
    class_names: tuple[str, ...]  # index i is label i + 1
    files: tuple[dict, ...]  # manifest entries: split, label, image, key, size, sha256

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_files(self, split: str) -> list[dict]:
        """The manifest entries of one split, sorted by key."""
        check_split(split)
        return sorted((f for f in self.files if f["split"] == split), key=lambda f: f["key"])


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def check_name(kind: str, value: str) -> str:
    # Both become parts of store keys and local paths: refuse anything that could escape them.
    if not isinstance(value, str) or not _NAME.match(value):
        raise DataError(f"invalid {kind} {value!r}: letters, digits, '.', '_' and '-' only")
    return value


def not_published(store: Store, dataset: str, version: str) -> DatasetNotFound:
    return DatasetNotFound(f"dataset '{dataset}' version '{version}' is not published on "
                           f"{store.uri} (run flowerml ingest)")


def read_current(store: Store, dataset: str) -> dict | None:
    """CURRENT's {"version", "manifest_sha256"}, or None when nothing is published."""
    key = f"{dataset_prefix(dataset)}/{CURRENT}"
    try:
        current = json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None
    except ValueError:
        raise DataError(f"{key}: not valid JSON") from None
    if not isinstance(current, dict) or not isinstance(current.get("version"), str):
        raise DataError(f"{key}: has no version")
    return current


def resolve_dataset(store: Store, dataset: str, version: str | None = None) -> PublishedDataset:
    """The published version `version` of `dataset` (CURRENT's when None), manifest verified."""
    check_name("dataset name", dataset)
    if version is not None:
        check_name("dataset version", version)
    current = read_current(store, dataset)
    if version is None:
        if current is None:
            raise not_published(store, dataset, "CURRENT")
        version = check_name("dataset version", current["version"])
    key = f"{version_prefix(dataset, version)}/{MANIFEST}"
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        raise not_published(store, dataset, version) from None
    digest = hashlib.sha256(raw).hexdigest()
    # CURRENT records the manifest's sha256, so the current version's file list is checked end
    # to end; an older version's manifest is trusted as read (its files are still verified).
    if current and current["version"] == version and current.get("manifest_sha256") not in (
            None, digest):
        raise DataError(f"{key}: sha256 {digest} differs from the {current['manifest_sha256']} "
                        f"that {dataset_prefix(dataset)}/{CURRENT} records")
    return parse_manifest(key, raw, dataset, version, digest)


def parse_manifest(key: str, raw: bytes, dataset: str, version: str,
                   digest: str) -> PublishedDataset:
    try:
        manifest = json.loads(raw)
        classes = sorted(manifest["classes"], key=lambda c: int(c["label"]))
        names = tuple(str(c["name"]) for c in classes)
        files = tuple(manifest["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{key}: not a flowerml manifest ({type(error).__name__}: {error})"
                        ) from None
    if manifest.get("version", version) != version:
        raise DataError(f"{key}: names version {manifest['version']!r}, not {version!r}")
    if [int(c["label"]) for c in classes] != list(range(1, len(classes) + 1)):
        raise DataError(f"{key}: class labels are not 1..{len(classes)}")
    for entry in files:
        check_entry(key, entry, len(names))
    return PublishedDataset(dataset, version, digest, names, files)


def check_entry(key: str, entry: Any, num_classes: int) -> None:
    """Refuse an entry that could write outside the cache or that names no real file."""
    try:
        split, label, path = entry["split"], entry["label"], entry["key"]
        ok = (split in SPLITS and isinstance(label, int) and 1 <= label <= num_classes
              and isinstance(entry["size"], int) and entry["size"] >= 0
              and isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])
              and isinstance(path, str) and path.startswith(f"{split}/") and "\\" not in path
              and all(part not in ("", ".", "..") for part in path.split("/")))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{key}: invalid file entry {entry!r}")


# --------------------------------------------------------------------------------------------
# Sync: the split on local disk, every file's sha256 checked


def local_root(cache_dir: Path, published: PublishedDataset) -> Path:
    return Path(cache_dir) / published.dataset / published.version


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes: torchrun's ranks share one cache on a node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_state(path: Path) -> list[int] | None:
    """(size, mtime, ctime) in ns: any write to the file, even one that restores its mtime,
    changes the ctime, so a stamped file whose state still matches has not been touched."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def parallel_map(work: Callable[[Any], Any], items: Sequence[Any],
                 workers: int | None = None) -> Iterator[Any]:
    """`work` over `items` on threads (hashlib, file I/O and Pillow release the GIL); the
    results in order, in the caller's thread, so progress reporting needs no locking."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    if workers == 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowerml-data") as pool:
        yield from pool.map(work, items)


def stamp_path(root: Path, split: str) -> Path:
    return root / f".verified-{split}.json"


def read_stamp(root: Path, split: str, manifest_sha256: str) -> dict[str, list[int]]:
    """The verified files' states recorded for this manifest; {} when absent or for another."""
    try:
        stamp = json.loads(stamp_path(root, split).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("manifest_sha256") != manifest_sha256:
        return {}
    files = stamp.get("files")
    return files if isinstance(files, dict) else {}


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def write_stamp(root: Path, split: str, manifest_sha256: str,
                files: dict[str, list[int]]) -> None:
    stamp = {"split": split, "manifest_sha256": manifest_sha256, "files": files}
    write_atomically(stamp_path(root, split), json.dumps(stamp, sort_keys=True).encode())


def sync_split(store: Store, published: PublishedDataset, splits: Sequence[str] | str,
               cache_dir: Path, *, progress: Progress | None = None) -> Path:
    """Make `<cache>/<dataset>/<version>/<split>/` hold exactly the manifest's files; the root.

    Files already there are trusted when the split's stamp records their current state,
    hashed otherwise; what is missing or differs is downloaded in parallel and hashed. A file
    whose sha256 does not match the manifest is deleted and named in the DataError.
    """
    progress = progress or NullProgress()
    root = local_root(cache_dir, published)
    for split in (splits,) if isinstance(splits, str) else splits:
        check_split(split)
        with file_lock(root / f".{split}.lock"):
            sync_one_split(store, published, split, root, progress)
    return root


def sync_one_split(store: Store, published: PublishedDataset, split: str, root: Path,
                   progress: Progress) -> None:
    entries = published.split_files(split)
    stamp = read_stamp(root, split, published.manifest_sha256)
    verified: dict[str, list[int]] = {}
    unchecked, todo = [], []
    for entry in entries:
        state = file_state(root / entry["key"])
        if state is not None and state[0] == entry["size"]:
            if stamp.get(entry["key"]) == state:
                verified[entry["key"]] = state
            else:
                unchecked.append(entry)
        else:
            todo.append(entry)
    if unchecked:
        progress.start(f"verifying {split}", len(unchecked))
        good, bad = verify_files(root, unchecked, progress)
        verified.update(good)
        todo.extend(bad)  # replaced by the download below: get_file swaps files atomically
    download_entries(store, published, split, root, todo, progress)
    good, bad = verify_files(root, todo, NullProgress()) if todo else ({}, [])
    verified.update(good)
    for entry in bad:
        (root / entry["key"]).unlink(missing_ok=True)  # never leave a bad file to be trusted
    if verified != stamp:
        write_stamp(root, split, published.manifest_sha256, verified)
    if bad:
        raise sha256_mismatch(published, bad)


def verify_files(root: Path, entries: list[dict],
                 progress: Progress) -> tuple[dict[str, list[int]], list[dict]]:
    """({key: state} of the files whose sha256 matches, [entries that do not])."""

    def check(entry: dict) -> tuple[dict, list[int] | None]:
        path = root / entry["key"]
        state = file_state(path)  # before hashing: a write during the hash changes the state
        try:
            ok = state is not None and sha256_of(path) == entry["sha256"]
        except FileNotFoundError:
            ok = False
        return entry, state if ok else None

    good, bad = {}, []
    for entry, state in parallel_map(check, entries):
        progress.advance()
        if state is None:
            bad.append(entry)
        else:
            good[entry["key"]] = state
    return good, bad


def download_entries(store: Store, published: PublishedDataset, split: str, root: Path,
                     entries: list[dict], progress: Progress) -> None:
    if not entries:
        return
    prefix = version_prefix(published.dataset, published.version)
    progress.start(f"downloading {split}", len(entries))
    items = [(f"{prefix}/{e['key']}", root / e["key"]) for e in entries]
    try:
        store.download_many(items, progress=lambda _size: progress.advance())
    except ObjectNotFound as error:
        raise DataError(f"{error}: the manifest of {published.dataset}@{published.version} "
                        "lists it, so the published version is incomplete (re-run flowerml "
                        "ingest)") from None


def sha256_mismatch(published: PublishedDataset, bad: list[dict]) -> DataError:
    prefix = version_prefix(published.dataset, published.version)
    keys = ", ".join(f"{prefix}/{e['key']}" for e in bad[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return DataError(f"{keys}{more}: sha256 mismatch: the store does not match the manifest "
                     "(the downloaded file was removed from the local cache)")


# --------------------------------------------------------------------------------------------
# The decoded cache: each JPEG decoded once, at the working resolution


def cache_resolution(image_size: int) -> int:
    """The decoded cache's side for training at `image_size` (224 -> 256)."""
    return round(image_size * RESIZE_RATIO)


def decode_square(path: Path, resolution: int) -> np.ndarray:
    """[R, R, 3] uint8: the short side resized to R, centre-cropped to a square.

    One Pillow call does both: `resize(box=...)` filters the centred square straight to R x R
    (the same geometry as Resize(R) + CenterCrop(R), without rounding the crop to whole pixels
    of an intermediate image). `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that
    still leaves the short side at least R, which skips most of the IDCT work.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            scale = resolution / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: does not decode: {error}") from None
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = rgb.resize((resolution, resolution), Image.Resampling.BILINEAR,
                        box=(left, top, left + side, top + side))
    return np.asarray(square)


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
                  resolution: int) -> tuple[Path, Path, Path]:
    """(images .npy, labels .npy, meta .json), named by split, resolution and manifest."""
    stem = f"{split}-{resolution}px-{published.manifest_sha256[:16]}-v{DECODE_FORMAT}"
    folder = root / "decoded"
    return folder / f"{stem}.npy", folder / f"{stem}.labels.npy", folder / f"{stem}.json"


def decoded_meta(published: PublishedDataset, split: str, resolution: int, count: int) -> dict:
    return {"split": split, "resolution": resolution, "count": count, "layout": "NHWC",
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


def build_decoded_split(root: Path, published: PublishedDataset, split: str, resolution: int,
                        *, workers: int | None = None,
                        progress: Progress | None = None) -> DecodedSplit:
    """The split decoded at `resolution`, built on first use (the split must be synced)."""
    check_split(split)
    if resolution < 1:
        raise DataError(f"resolution must be positive: got {resolution}")
    entries = published.split_files(split)
    if not entries:
        raise DataError(f"split '{split}' of {published.dataset}@{published.version} "
                        "has no images")
    paths = decoded_paths(Path(root), published, split, resolution)
    meta = decoded_meta(published, split, resolution, len(entries))
    with file_lock(paths[0].with_suffix(".lock")):
        existing = open_decoded(paths, meta)
        if existing is not None:
            return existing
        files = [Path(root) / e["key"] for e in entries]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{', '.join(missing[:_MAX_LISTED])}: not in the local cache "
                            "(sync the split first)")
        labels = np.array([e["label"] - 1 for e in entries], dtype=np.int64)
        decode_into(paths[0], files, resolution, workers, progress or NullProgress())
        write_npy_atomically(paths[1], labels)
        # The meta file is the pointer: written last, so a cache is used only when complete.
        write_atomically(paths[2], json.dumps(meta, sort_keys=True).encode())
    return DecodedSplit(paths[0], labels, decoded=len(files))


def decode_into(path: Path, files: list[Path], resolution: int, workers: int | None,
                progress: Progress) -> None:
    """Decode `files` into a new .npy at `path`, which appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8,
                                          shape=(len(files), resolution, resolution, 3))
        progress.start("decoding images", len(files))
        fill(array, files, resolution, workers, progress)
        array.flush()
        del array  # unmapped before the rename
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def fill(array: np.ndarray, files: list[Path], resolution: int, workers: int | None,
         progress: Progress) -> None:
    """array[i] = files[i] decoded, on threads (Pillow releases the GIL to decode and resize)."""

    def decode(index: int) -> None:
        array[index] = decode_square(files[index], resolution)

    for _ in parallel_map(decode, range(len(files)), workers):
        progress.advance()


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        np.save(temp, array)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Datasets


class CachedImageDataset(Dataset):
    """(uint8 [3, S, S] tensor, 0-based label) from a DecodedSplit through a uint8 transform."""

    def __init__(self, split: DecodedSplit,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # HWC storage viewed as CHW is channels-last, the layout torch's uint8 antialiased
        # resize kernel is fastest on; nothing is copied until the transform's output.
        image = torch.from_numpy(self.split.images[index]).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[index])


class FolderImageDataset(Dataset):
    """(transform(PIL image), 0-based label) from the synced folder, like ImageFolder.

    The file list comes from the manifest, not a directory scan, so stray files in the cache
    are never read and the labels are the manifest's, not a folder-name sort order.
    """

    def __init__(self, root: Path, published: PublishedDataset, split: str,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        entries = published.split_files(split)
        self.samples = [(Path(root) / e["key"], e["label"] - 1) for e in entries]
        self.targets = [label for _path, label in self.samples]
        self.transform = transform
        missing = [str(path) for path, _label in self.samples if not path.is_file()]
        if missing:
            raise DataError(f"{', '.join(missing[:_MAX_LISTED])}: not in the local cache "
                            "(sync the split first)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform else rgb), label


# --------------------------------------------------------------------------------------------
# Transforms


def planar(image: torch.Tensor) -> torch.Tensor:
    """`image` as a contiguous [3, H, W] tensor. NumPy's strided uint8 copy is about twice as
    fast as torch's for the channels-last -> planar transpose."""
    if image.is_contiguous():
        return image
    return torch.from_numpy(np.ascontiguousarray(image.numpy()))


class ToPlanar(torch.nn.Module):
    """Makes the image a contiguous [3, H, W] tensor, so the batch collates with a memcpy."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return planar(image)


class ChannelsLastResizedCrop(v2.RandomResizedCrop):
    """torchvision's v2 RandomResizedCrop (same parameters, same random draws), with a fast
    path for uint8 [3, H, W] tensors.

    torch's antialiased bilinear kernel for uint8 works in channels-last layout; a strided
    crop of the cache is repacked into it and back inside the kernel, which costs more than
    the resize itself. Packing the crop channels-last once, resizing, then transposing to
    planar with NumPy is ~2x faster and gives the same pixels. The output is a contiguous
    [3, S, S] uint8 tensor.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if (type(inpt) is not torch.Tensor or inpt.dtype != torch.uint8 or inpt.dim() != 3
                or self.interpolation not in (v2.InterpolationMode.BILINEAR, "bilinear")
                or not self.antialias):
            return super().transform(inpt, params)
        top, left = params["top"], params["left"]
        crop = inpt[:, top:top + params["height"], left:left + params["width"]]
        packed = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        resized = torch.nn.functional.interpolate(packed, size=list(self.size), mode="bilinear",
                                                  antialias=True, align_corners=False)
        return planar(resized[0])


class FusedColorJitter(torch.nn.Module):
    """Brightness, contrast, saturation and hue jitter on a uint8 [3, H, W] tensor in one pass.

    Each of the four adjustments is affine in RGB (hue as a rotation about the grey axis, the
    small-angle stand-in for an HSV hue shift), so they compose into one 3x3 matrix and an
    offset applied with a single matmul: ~20x cheaper than torchvision's ColorJitter on
    tensors, whose HSV round trip for hue alone costs more than the rest of the pipeline.
    Factors are drawn like ColorJitter's (uniform in [1-x, 1+x], hue in [-h, h]) from torch's
    RNG, so DataLoader workers' seeding applies; the order is fixed (brightness, contrast,
    saturation, hue) and only the result is clamped. Applied with probability `p`.
    """

    GREY = (0.299, 0.587, 0.114)

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.02, p: float = 0.8) -> None:
        super().__init__()
        if not 0 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0 or not 0 <= p <= 1:
            raise ValueError("jitter amounts must be >= 0, hue <= 0.5 and p in [0, 1]")
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)
        self.p = p

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p}")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(5).tolist()
        return image if draws[4] >= self.p else self.apply(image, draws[:4])

    def apply(self, image: torch.Tensor, draws: list[float]) -> torch.Tensor:
        """The jitter for four uniform draws in [0, 1) (brightness, contrast, saturation, hue)."""
        pixels = planar(image).reshape(3, -1).float()  # planar: channel-mixing is one matmul
        matrix, offset = self.affine(draws, pixels.mean(dim=1).tolist())
        # + 0.5 then truncation by the uint8 cast rounds to nearest. NumPy's float->uint8
        # cast is vectorised and several times faster than torch's on CPU.
        out = torch.addmm(torch.tensor(offset, dtype=torch.float32)[:, None] + 0.5,
                          torch.tensor(matrix, dtype=torch.float32), pixels)
        return torch.from_numpy(out.clamp_(0, 255).numpy().astype(np.uint8)).view(image.shape)

    def affine(self, draws: list[float],
               mean: list[float]) -> tuple[list[list[float]], list[float]]:
        """(3x3 matrix, offset) of the four adjustments for these uniform draws.

        Plain floats: on 3x3 matrices, NumPy's per-call overhead would cost more than the
        arithmetic on the whole image.
        """

        def factor(amount: float, draw: float) -> float:
            low = max(0.0, 1 - amount)
            return low + draw * (1 + amount - low)

        brightness = factor(self.brightness, draws[0])
        contrast = factor(self.contrast, draws[1])
        saturation = factor(self.saturation, draws[2])
        angle = (2 * draws[3] - 1) * self.hue * 2 * math.pi
        # Brightness scales; contrast then blends with the mean grey level at that point.
        grey_mean = brightness * sum(g * m for g, m in zip(self.GREY, mean, strict=True))
        scale, shift = brightness * contrast, (1 - contrast) * grey_mean
        desaturate = [[saturation * (i == j) + (1 - saturation) * self.GREY[j]
                       for j in range(3)] for i in range(3)]
        colour = matmul3(grey_axis_rotation(angle), desaturate)
        matrix = [[scale * value for value in row] for row in colour]
        offset = [shift * sum(row) for row in colour]  # colour @ (shift, shift, shift)
        return matrix, offset


def matmul3(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def grey_axis_rotation(angle: float) -> list[list[float]]:
    """Rodrigues' rotation about (1, 1, 1)/sqrt(3): turns hue, keeps the grey level."""
    k = 1 / math.sqrt(3)
    cos, sin = math.cos(angle), math.sin(angle)
    cross = ((0, -k, k), (k, 0, -k), (-k, k, 0))
    return [[cos * (i == j) + sin * cross[i][j] + (1 - cos) * k * k for j in range(3)]
            for i in range(3)]


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise DataError(f"--augment must be one of {', '.join(PRESETS)}: got {preset!r}")
    return preset


def build_transforms(preset: str, image_size: int = 224, *, train: bool) -> Callable:
    """The transform of a preset for training or evaluation.

    - `standard`: on the uint8 decoded cache (short side round(S*256/224), square). Train:
      RandomResizedCrop(S, scale 0.25-1) + horizontal flip + a mild colour jitter (p=0.8);
      flowers' colour is a class cue, so hue moves by at most 0.02 of the circle. Eval:
      CenterCrop(S), the tutorial's Resize(256)+CenterCrop(224) geometry. Output uint8
      [3, S, S]; `prepare_batch` normalises on the device.
    - `tutorial`: exactly the original notebook's PIL transforms on the full-size JPEGs,
      output normalised float (use with FolderImageDataset).
    - `none`: the eval transform for training too.
    """
    from torchvision import transforms

    check_preset(preset)
    if image_size < 1:
        raise DataError(f"image size must be positive: got {image_size}")
    if preset == "tutorial":
        normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if train:
            return transforms.Compose([
                transforms.RandomRotation(45), transforms.CenterCrop(image_size),
                transforms.RandomVerticalFlip(0.5), transforms.RandomHorizontalFlip(0.5),
                transforms.ColorJitter(brightness=0.2, contrast=0.1, saturation=0.1, hue=0.1),
                transforms.RandomGrayscale(0.025), *normalise])
        return transforms.Compose([transforms.Resize(cache_resolution(image_size)),
                                   transforms.CenterCrop(image_size), *normalise])
    if preset == "standard" and train:
        return v2.Compose([
            ChannelsLastResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            FusedColorJitter(0.2, 0.2, 0.2, 0.02, p=0.8)])
    return v2.Compose([v2.CenterCrop(image_size), ToPlanar()])


# --------------------------------------------------------------------------------------------
# On the device


@lru_cache(maxsize=16)
def _normaliser(device: torch.device, mean: tuple[float, ...],
                std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh tensor per batch would be a blocking host-to-device copy.
    shape = (-1, 1, 1)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))


def prepare_batch(images: torch.Tensor, device: torch.device | str, *,
                  channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """A batch on `device`, ready for the model.

    uint8 batches (the cache presets) cross to the device as bytes, a quarter of float32's
    traffic, and become float32 there: /255 then (x - mean) / std, the same arithmetic as
    ToTensor + Normalize. Float batches (the tutorial preset) are already normalised.
    """
    device = torch.device(device)
    # Copy first, convert the layout on the device: a host-side transpose would be slow and
    # would leave pinned memory, making the copy synchronous. uint8 moves 1 byte per value.
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype != torch.uint8:
        return images
    shift, scale = _normaliser(device, tuple(map(float, mean)), tuple(map(float, std)))
    return images.float().div_(255).sub_(shift).div_(scale)


# --------------------------------------------------------------------------------------------
# Loaders


class ShardSampler(Sampler[int]):
    """Indices rank, rank+world, ... in order: every item exactly once across ranks, no
    padding duplicates (shards differ by at most one item), for sharded evaluation."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


@dataclass
class Loaders:
    """The loaders of one run; a split's loader is None when it was not asked for."""

    train: DataLoader | None
    valid: DataLoader | None
    test: DataLoader | None
    num_classes: int
    class_names: tuple[str, ...]


def default_workers(workers: int | None) -> int:
    if workers is None:
        return min(8, os.cpu_count() or 1)
    if workers < 0:
        raise DataError(f"workers must be >= 0: got {workers}")
    return workers


def split_dataset(root: Path, published: PublishedDataset, split: str, preset: str,
                  image_size: int, train: bool, workers: int) -> Dataset:
    if not published.split_files(split):
        raise DataError(f"split '{split}' of {published.dataset}@{published.version} "
                        "has no images")
    transform = build_transforms(preset, image_size, train=train)
    if preset == "tutorial":
        return FolderImageDataset(root, published, split, transform)
    decoded = build_decoded_split(root, published, split, cache_resolution(image_size),
                                  workers=max(1, workers or os.cpu_count() or 1))
    return CachedImageDataset(decoded, transform)


def make_loader(dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool,
                persistent: bool, shuffle: bool = False, sampler: Sampler | None = None,
                generator: torch.Generator | None = None) -> DataLoader:
    extra: dict[str, Any] = {}
    if workers > 0:
        # Every batch in flight sits in /dev/shm, which containers often keep small: two per
        # worker (torch's default) is plenty when a sample costs a fraction of a millisecond.
        extra = {"persistent_workers": persistent, "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=False, generator=generator, **extra)


def build_loaders(store: Store, published: PublishedDataset, cache_dir: Path, *,
                  preset: str = "standard", image_size: int = 224, batch_size: int = 64,
                  workers: int | None = None, splits: Iterable[str] = ("train", "valid"),
                  pin_memory: bool | None = None, seed: int = 0,
                  distributed: bool = False) -> Loaders:
    """Sync the splits, build their datasets, and wrap them in DataLoaders.

    Train is shuffled by a generator seeded with `seed`, which also seeds the workers'
    augmentation RNGs (with `workers=0` the augmentations draw from torch's global RNG, so
    seed that too for a repeatable run). With `distributed`, train uses a DistributedSampler (call
    `set_epoch`); valid and test stay whole and in order on every rank, because the
    evaluation computes its metrics in one process (`ShardSampler` shards them instead).
    """
    check_preset(preset)
    splits = tuple(dict.fromkeys(check_split(s) for s in splits))
    workers = default_workers(workers)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    if batch_size < 1:
        raise DataError(f"batch size must be positive: got {batch_size}")
    root = sync_split(store, published, splits, cache_dir)
    loaders: dict[str, DataLoader] = {}
    for split in splits:
        train = split == "train"
        dataset = split_dataset(root, published, split, preset, image_size, train, workers)
        sampler, generator = None, None
        if train:
            rank = torch.distributed.get_rank() if distributed else 0
            # Per-rank worker seeds, so ranks do not draw the same augmentations in lockstep.
            generator = torch.Generator().manual_seed(seed + rank)
            if distributed:
                sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        loaders[split] = make_loader(dataset, batch_size=batch_size, workers=workers,
                                     pin_memory=pin_memory, persistent=split != "test",
                                     shuffle=train, sampler=sampler, generator=generator)
    return Loaders(loaders.get("train"), loaders.get("valid"), loaders.get("test"),
                   published.num_classes, published.class_names)


def build_eval_loader(store: Store, published: PublishedDataset, cache_dir: Path, *,
                      split: str = "test", preset: str = "standard", image_size: int = 224,
                      batch_size: int = 64, workers: int | None = None,
                      pin_memory: bool | None = None) -> DataLoader:
    """One split, in order, through the eval transform (for `flowerml evaluate`)."""
    check_preset(preset)
    check_split(split)
    workers = default_workers(workers)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    root = sync_split(store, published, (split,), cache_dir)
    dataset = split_dataset(root, published, split, preset, image_size, False, workers)
    return make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=pin_memory,
                       persistent=False)

