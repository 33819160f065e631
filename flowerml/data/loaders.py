"""Loaders: a published split as PyTorch datasets and DataLoaders.

`build_loaders` syncs the splits a run asks for, builds each one's dataset through its preset's
transform (the decode cache for `standard` and `none`, the synced JPEG folder for `tutorial`)
and wraps it in a DataLoader: train shuffled by a seeded generator (a DistributedSampler under
torchrun), valid and test whole and in order. `build_eval_loader` is one split for evaluation
(`prepare_eval_split` makes it ready ahead); `ShardSampler` shards an evaluation across ranks
without duplicates. Every split is decoded at the model's `Preprocessing` (resize and filter;
default: `default_preprocessing(image_size)`), so a model is validated and evaluated on the
pixels its weights expect.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from flowerml.core.errors import DataError
from flowerml.data.cache import DecodedSplit, build_decoded_split
from flowerml.data.manifest import PublishedDataset, check_split
from flowerml.data.preprocessing import Preprocessing, default_preprocessing
from flowerml.data.sync import require_synced, sync_split
from flowerml.data.transforms import build_transforms, check_preset
from flowerml.io.storage import Store

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
        self.samples = [(Path(root) / e.key, e.label - 1) for e in entries]
        self.targets = [label for _path, label in self.samples]
        self.transform = transform
        require_synced([path for path, _label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform else rgb), label


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
                  image_size: int, train: bool,
                  preprocessing: Preprocessing | None = None) -> Dataset:
    if not published.split_files(split):
        raise DataError(f"split '{split}' of {published.dataset}@{published.version} "
                        "has no images")
    pre = model_preprocessing(preprocessing, image_size)
    transform = build_transforms(preset, image_size, train=train, preprocessing=pre)
    if preset == "tutorial":
        return FolderImageDataset(root, published, split, transform)
    # Decoded on every core (workers=None): the DataLoader's workers have not started yet.
    decoded = build_decoded_split(root, published, split, pre)
    return CachedImageDataset(decoded, transform)


def model_preprocessing(preprocessing: Preprocessing | None, image_size: int) -> Preprocessing:
    """`preprocessing` (default: today's for `image_size`), refused when its crop is not the
    size the model is trained or evaluated at."""
    if preprocessing is None:
        return default_preprocessing(image_size)
    if preprocessing.crop != image_size:
        raise DataError(f"preprocessing crops {preprocessing.crop} px, but the image size is "
                        f"{image_size}")
    return preprocessing


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
                  distributed: bool = False,
                  preprocessing: Preprocessing | None = None) -> Loaders:
    """Sync the splits, build their datasets, and wrap them in DataLoaders.

    Train is shuffled by a generator seeded with `seed`, which also seeds the workers'
    augmentation RNGs (with `workers=0` the augmentations draw from torch's global RNG, so
    seed that too for a repeatable run). With `distributed`, train uses a DistributedSampler (call
    `set_epoch`); valid and test stay whole and in order on every rank, because the
    evaluation computes its metrics in one process (`ShardSampler` shards them instead).
    `preprocessing`: the model's (see the module docstring).
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
        dataset = split_dataset(root, published, split, preset, image_size, train,
                                preprocessing)
        sampler, generator = train_order(dataset, seed, distributed) if train else (None, None)
        loaders[split] = make_loader(dataset, batch_size=batch_size, workers=workers,
                                     pin_memory=pin_memory, persistent=split != "test",
                                     shuffle=train, sampler=sampler, generator=generator)
    return Loaders(loaders.get("train"), loaders.get("valid"), loaders.get("test"),
                   published.num_classes, published.class_names)


def train_order(dataset: Dataset, seed: int,
                distributed: bool) -> tuple[Sampler | None, torch.Generator]:
    """(sampler, generator) of the train loader: a DistributedSampler under torchrun, and a
    generator seeded per rank, so ranks do not draw the same augmentations in lockstep."""
    rank = torch.distributed.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(seed + rank)
    if not distributed:
        return None, generator
    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False), generator


def build_eval_loader(store: Store, published: PublishedDataset, cache_dir: Path, *,
                      split: str = "test", preset: str = "standard", image_size: int = 224,
                      batch_size: int = 64, workers: int | None = None,
                      pin_memory: bool | None = None,
                      preprocessing: Preprocessing | None = None) -> DataLoader:
    """One split, in order, through the eval transform (for `flowerml evaluate`), decoded at
    the model's `preprocessing`."""
    check_preset(preset)
    check_split(split)
    workers = default_workers(workers)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    root = sync_split(store, published, (split,), cache_dir)
    dataset = split_dataset(root, published, split, preset, image_size, False, preprocessing)
    return make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=pin_memory,
                       persistent=False)


def prepare_eval_split(store: Store, published: PublishedDataset, cache_dir: Path, *,
                       split: str = "test", image_size: int = 224,
                       preprocessing: Preprocessing | None = None) -> DecodedSplit:
    """What `build_eval_loader` reads, made ahead: the split synced and decoded at the model's
    `preprocessing`. Both steps hold a lock, so a loader built meanwhile waits, then reuses."""
    root = sync_split(store, published, (split,), cache_dir)
    return build_decoded_split(root, published, split,
                               model_preprocessing(preprocessing, image_size))
