"""A dataset of the user's own classes: `flowerml ingest --source imagefolder:PATH`.

PATH (a local folder or an `s3://bucket/prefix`) holds either

- `train/`, `valid/` and `test/`, each a folder of the same class folders, or
- class folders alone, split here with `--split-ratios TRAIN,VALID,TEST` and `--seed`:
  stratified (each class split by the ratios, rounded, at least one image in every split) and
  deterministic (the same files, ratios and seed give the same split, on any machine).

The class names are the class folders' names, sorted; labels are 1..N in that order. Images
are read with `flowerml ingest --add`'s folder reading (`additions.class_folder_images`) and
checked with its checks (ingest's `check_jpeg`: a JPEG that decodes, under PIL's bomb limit);
one that fails is quarantined as ingest quarantines the archive's, and the rest are published
through ingest's one publish path (`ingest.publish_version`: content-addressed version,
quarantine.json, manifest.json, CURRENT) under `<split>/<NNN>/<name>`, `<name>` the file's
path below its class folder with '/' as '_'. The same bytes in two splits are refused as
ingest refuses them (leakage); with ratios, the same bytes twice in a class are published once.

Bad input is refused before any image is read, with one line naming the folder or option
(`ImageFolderError`): PATH missing, no class folders, a class folder without images, only some
of train/valid/test, classes differing between splits, ratios that do not parse, do not sum to
1 or leave a split empty for some class, ratios for a PATH that is already split.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flowerml.core.errors import DataError
from flowerml.core.progress import NullProgress, Progress
from flowerml.data import flowers
from flowerml.data.add import check_one_label_per_image
from flowerml.data.additions import (
    CheckedImage,
    LabelledImage,
    check_images,
    class_folder_images,
    open_source_store,
)
from flowerml.data.ingest import (
    IngestResult,
    check_leakage,
    leaves_no_empty_folders,
    publish_version,
)
from flowerml.data.manifest import ManifestEntry, check_name
from flowerml.io.locations import ImageFolderLocation, LocalLocation
from flowerml.io.storage import S3Options, Store

SPLITS = flowers.SPLITS
RATIOS_OPTION = "--split-ratios"
RATIO_TOLERANCE = 1e-6


class ImageFolderError(DataError):
    """An imagefolder PATH or option that cannot be published; one line naming it."""


@dataclass(frozen=True)
class FolderImage:
    """One image file of PATH: its split folder (None before a ratio split), class, place."""

    split: str | None
    class_name: str
    store: Store
    key: str

    @property
    def name(self) -> str:
        """Its name in the published split: the path below its class folder, '/' as '_'."""
        return self.key.split("/", 1)[1].replace("/", "_")


@dataclass(frozen=True)
class ImageFolder:
    """PATH read: its class names (sorted) and every image file, with its split when PATH is
    already split into train/ valid/ test/."""

    shown: str
    class_names: tuple[str, ...]
    images: tuple[FolderImage, ...]
    presplit: bool

    def label_of(self, image: FolderImage) -> int:
        return self.class_names.index(image.class_name) + 1


# --------------------------------------------------------------------------------------------
# Options


def parse_split_ratios(text: str) -> tuple[float, float, float]:
    """`--split-ratios TRAIN,VALID,TEST`: three numbers between 0 and 1 that sum to 1."""
    parts = text.split(",")
    try:
        ratios = tuple(float(part) for part in parts)
    except ValueError:
        ratios = ()
    if len(ratios) != len(SPLITS) or not all(0 <= r <= 1 for r in ratios):
        raise ImageFolderError(f"{RATIOS_OPTION} {text}: three numbers between 0 and 1 for "
                               "train,valid,test (for example 0.8,0.1,0.1)")
    if abs(sum(ratios) - 1) > RATIO_TOLERANCE:
        raise ImageFolderError(f"{RATIOS_OPTION} {text}: the ratios sum to {sum(ratios):g}, "
                               "not 1")
    return ratios  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Reading PATH


def top_folders(store: Store, location: ImageFolderLocation) -> list[str]:
    """The folders directly under PATH (empty ones too, on a local disk), hidden ones skipped."""
    if isinstance(location.root, LocalLocation):
        path = location.root.path
        if not path.is_dir():
            raise ImageFolderError(f"{location.shown}: folder {path} does not exist"
                                   if not path.exists() else
                                   f"{location.shown}: {path} is a file, not a folder")
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted({info.key.split("/")[0] for info in store.list("")
                   if "/" in info.key and not info.key.startswith(".")})


def read_class_folders(store: Store, split: str | None, what: str,
                       s3: S3Options | None) -> dict[str, list[FolderImage]]:
    """The image files of a folder of class folders (PATH, or its `split` folder), by class
    name, sorted; a class folder without an image is refused."""
    if split is not None:
        store = open_source_store(store.location(split), s3)
    by_class: dict[str, list[FolderImage]] = {name: [] for name in class_folder_names(store)}
    for class_name, key in class_folder_images(store, what, ImageFolderError):
        by_class.setdefault(class_name, []).append(FolderImage(split, class_name, store, key))
    if not by_class:
        raise ImageFolderError(f"{store.uri}: no class folders ({what} holds one "
                               "folder of images per class)")
    for class_name, images in by_class.items():
        if not images:
            raise ImageFolderError(f"{store.location(class_name)}: no images in this class "
                                   "folder")
    return dict(sorted(by_class.items()))


def class_folder_names(store: Store) -> list[str]:
    """Every class folder under a local store's root, empty ones included (S3 has none)."""
    root = getattr(store, "root", None)
    if root is None or not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def read_image_folder(location: ImageFolderLocation, *, ratios: bool,
                      s3: S3Options | None = None) -> ImageFolder:
    """PATH read as class folders or train/ valid/ test/ of them; `ratios` says whether
    --split-ratios was given (required without split folders, refused with them)."""
    store = open_source_store(location.uri, s3)
    folders = top_folders(store, location)
    split_folders = [name for name in folders if name in SPLITS]
    if not split_folders:
        if not ratios:
            raise ImageFolderError(f"{location.shown}: class folders without train/ valid/ "
                                   f"test/: give {RATIOS_OPTION} (for example 0.8,0.1,0.1) "
                                   "and --seed to split them")
        by_class = read_class_folders(store, None, location.shown, s3)
        return ImageFolder(location.shown, tuple(by_class),
                           tuple(i for images in by_class.values() for i in images), False)
    missing = [name for name in SPLITS if name not in split_folders]
    if missing:
        raise ImageFolderError(f"{location.shown}: has {', '.join(s + '/' for s in split_folders)}"
                               f" but no {', '.join(s + '/' for s in missing)} (give all three "
                               f"split folders, or class folders alone with {RATIOS_OPTION})")
    others = [name for name in folders if name not in SPLITS]
    if others:
        raise ImageFolderError(f"{store.location(others[0])}: not train/, valid/ or test/ "
                               f"({location.shown} holds split folders)")
    if ratios:
        raise ImageFolderError(f"{RATIOS_OPTION}: {location.shown} is already split into "
                               "train/ valid/ test/")
    splits = {split: read_class_folders(store, split, f"{location.shown} {split}/", s3)
              for split in SPLITS}
    class_names = tuple(splits["train"])
    for split in ("valid", "test"):
        check_same_classes(store, split, class_names, tuple(splits[split]))
    return ImageFolder(location.shown, class_names, tuple(
        image for split in SPLITS for images in splits[split].values() for image in images),
        True)


def check_same_classes(store: Store, split: str, train: Sequence[str],
                       classes: Sequence[str]) -> None:
    missing = [name for name in train if name not in classes]
    if missing:
        raise ImageFolderError(f"{store.location(split)}: no class folder {missing[0]!r} "
                               "(train/ has it; every split holds the same classes)")
    extra = [name for name in classes if name not in train]
    if extra:
        raise ImageFolderError(f"{store.location(f'{split}/{extra[0]}')}: not a class of "
                               "train/ (every split holds the same classes)")


# --------------------------------------------------------------------------------------------
# The deterministic stratified split


def split_counts(total: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """(train, valid, test) counts of `total` images: valid and test rounded half up, the rest
    train."""
    valid, test = (math.floor(total * ratio + 0.5) for ratio in ratios[1:])
    return total - valid - test, valid, test


def assign_splits(folder: ImageFolder, checked: Sequence[CheckedImage],
                  ratios: Sequence[float], seed: int) -> dict[int, str]:
    """{index of an image that passed its checks: its split}, each class shuffled on its own
    (seeded by the seed and the class name, so adding a class moves no other) and cut by the
    ratios. The same bytes twice in a class count (and are published) once."""
    by_class: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for index, (image, result) in enumerate(zip(folder.images, checked, strict=True)):
        if result.problem is None and result.sha256 not in seen:
            seen.add(result.sha256)
            by_class[image.class_name].append(index)
    assigned = {}
    for class_name in folder.class_names:
        indices = by_class.get(class_name, [])
        counts = split_counts(len(indices), ratios)
        empty = [split for split, count in zip(SPLITS, counts, strict=True) if count <= 0]
        if empty:
            where = folder.images[0].store.location(class_name)
            raise ImageFolderError(
                f"{where}: {len(indices)} usable image(s) leave {empty[0]} empty at "
                f"{RATIOS_OPTION} {','.join(f'{r:g}' for r in ratios)} (every split needs "
                "at least one image of each class)")
        order = sorted(indices, key=lambda i: checked[i].sha256)
        random.Random(f"{seed}/{class_name}").shuffle(order)
        train, valid, _test = counts
        for position, index in enumerate(order):
            assigned[index] = ("train" if position < train else
                               "valid" if position < train + valid else "test")
    return assigned


# --------------------------------------------------------------------------------------------
# Publishing


def build_imagefolder_entries(folder: ImageFolder, checked: Sequence[CheckedImage],
                              splits: dict[int, str]) -> tuple[list[ManifestEntry], list[dict]]:
    """(manifest entries, quarantine.json items) of the images, each in its split."""
    entries, quarantine = [], []
    for index, (image, result) in enumerate(zip(folder.images, checked, strict=True)):
        label = folder.label_of(image)
        if result.problem is not None:
            where = f"{image.split}/{image.key}" if image.split else image.key
            quarantine.append({"image": where, "split": image.split or "unsplit",
                               "label": label, "reason": result.problem})
            continue
        split = image.split or splits.get(index)
        if split is None:
            continue  # a second copy of the same bytes in its class (ratio split)
        entries.append(ManifestEntry(split, label, image.name,
                                     f"{split}/{flowers.class_dir(label)}/{image.name}",
                                     result.size, result.sha256))
    check_unique_keys(entries)
    return sorted(entries, key=lambda e: e.key), sorted(quarantine, key=lambda q: q["image"])


def check_unique_keys(entries: Sequence[ManifestEntry]) -> None:
    keys: set[str] = set()
    for entry in entries:
        if entry.key in keys:
            raise ImageFolderError(f"{entry.key}: two files of one class folder publish as "
                                   f"{entry.image} (rename one)")
        keys.add(entry.key)


def staging_folder(cache_dir: Path, dataset: str) -> Path:
    return cache_dir / dataset / "imagefolder"


@leaves_no_empty_folders
def publish_image_folder(location: ImageFolderLocation, store: Store, dataset: str,
                         cache_dir: Path, *, split_ratios: str | None = None, seed: int = 0,
                         s3: S3Options | None = None, workers: int | None = None,
                         progress: Progress | None = None
                         ) -> tuple[IngestResult, tuple[str, ...]]:
    """Publish PATH's class folders as a version of `dataset` (CURRENT moves to it); the
    result and the dataset's class names (label 1 first)."""
    progress = progress or NullProgress()
    check_name("dataset name", dataset)
    ratios = parse_split_ratios(split_ratios) if split_ratios is not None else None
    folder = read_image_folder(location, ratios=ratios is not None, s3=s3)
    store.check()
    store.check_writable()
    labelled = [LabelledImage(image.store.location(image.key), folder.label_of(image),
                              image.store, image.key) for image in folder.images]
    progress.start("checking images", len(labelled))
    staged = staging_folder(cache_dir, dataset)
    checked = check_images(labelled, staged, workers, progress.advance)
    if ratios is not None:  # before the split: it publishes the same bytes once per class
        check_one_label_per_image(checked)
    splits = assign_splits(folder, checked, ratios, seed) if ratios is not None else {}
    entries, quarantine = build_imagefolder_entries(folder, checked, splits)
    check_leakage(entries)
    check_one_label_per_image(checked)  # the same bytes under two classes of one split
    sources = {"imagefolder": {"path": location.shown, "split_ratios": list(ratios or []),
                               "seed": seed if ratios is not None else None}}
    result = publish_version(store, dataset, folder.class_names, entries, quarantine,
                             sources=sources, synthetic=False,
                             staged=lambda entry: staged / entry.sha256, progress=progress,
                             cache_dir=cache_dir)
    return result, folder.class_names
