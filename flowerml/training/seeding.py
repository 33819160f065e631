"""Seeding: a run's randomness as a function of its seed, so that a resume is bit-exact.

It owns the global seeding of a run (`seed_everything`), the RNG states a checkpoint keeps
(`rng_state`, `restore_rng_state`), and the train loader whose order and augmentations depend
on (seed, epoch, index) alone (`epoch_loader`: `EpochOrder` and `EpochSeeded`), so that a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from flowerml.data.loaders import make_loader


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so weights_only loading restores them."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation in one epoch: a function of nothing else."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochOrder(Sampler[int]):
    """The train order of an epoch from (seed, epoch) alone, each index tagged with its epoch.

    It yields `epoch * n + i`, which `EpochSeeded` turns back into item `i` with its RNGs seeded
    from (seed, epoch, i). Nothing depends on a stream that ran through earlier epochs (neither
    the order nor the DataLoader workers' RNGs, which persistent workers would carry across
    epochs), so a resumed run sees exactly the batches an uninterrupted one would, whatever the
    number of workers. Under torchrun the wrapped DistributedSampler orders each rank's share.
    """

    def __init__(self, length: int, seed: int, ranks: DistributedSampler | None = None) -> None:
        self.length, self.seed, self.ranks, self.epoch = length, seed, ranks, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.ranks is not None:
            self.ranks.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.ranks is not None:
            order = list(self.ranks)
        else:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.length, generator=generator).tolist()
        return iter([self.epoch * self.length + i for i in order])

    def __len__(self) -> int:
        return len(self.ranks) if self.ranks is not None else self.length


class EpochSeeded(Dataset):
    """Item `i` of `dataset` for index `epoch * n + i`, drawn with torch's, numpy's and
    Python's RNGs seeded from (seed, epoch, i). In a DataLoader worker those RNGs are the
    worker's own; in the main process (`workers=0`) torch's CPU RNG is put back afterwards, so
    the model's own random draws keep their stream (numpy's and Python's serve only the data)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: int) -> Any:
        epoch, index = divmod(tagged, len(self.dataset))
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)


def epoch_loader(loader: DataLoader, seed: int) -> DataLoader:
    """`loader` (a train loader from `build_loaders`) re-made to draw its order and its
    augmentations per epoch (`EpochOrder`, `EpochSeeded`); call `set_epoch` before each epoch."""
    ranks = loader.sampler if isinstance(loader.sampler, DistributedSampler) else None
    return make_loader(EpochSeeded(loader.dataset, seed), batch_size=loader.batch_size,
                       workers=loader.num_workers, pin_memory=loader.pin_memory,
                       persistent=loader.persistent_workers,
                       sampler=EpochOrder(len(loader.dataset), seed, ranks),
                       # worker base seeds are drawn from this, not from torch's global RNG
                       generator=torch.Generator().manual_seed(seed))

