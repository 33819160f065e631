"""flowerml.data.loaders on both stores: datasets and DataLoaders for each preset, seeded, sharded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flowerml.core.errors import DataError
from flowerml.data.loaders import ShardSampler, build_eval_loader, build_loaders
from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore

DATASET = "flowers102"
SIZE = 32


@pytest.mark.parametrize("preset", ["standard", "tutorial"])
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2 worker processes
def test_build_loaders_yields_batches(local_store: LocalStore, local_published: PublishedDataset,
                                      tmp_path: Path, preset: str, workers: int) -> None:
    loaders = build_loaders(local_store, local_published, tmp_path / "cache", preset=preset,
                            image_size=SIZE, batch_size=3, workers=workers, seed=1)
    assert loaders.test is None
    assert loaders.num_classes == 4 and loaders.class_names == local_published.class_names
    dtype = torch.uint8 if preset == "standard" else torch.float32
    for loader in (loaders.train, loaders.valid):
        batches = list(loader)
        assert [len(targets) for _, targets in batches] == [3, 3, 2]
        for images, targets in batches:
            assert images.dtype == dtype and tuple(images.shape[1:]) == (3, SIZE, SIZE)
            assert targets.dtype == torch.int64
            assert int(targets.min()) >= 0 and int(targets.max()) < 4
    valid_labels = torch.cat([t for _, t in loaders.valid]).tolist()
    assert valid_labels == [e.label - 1 for e in local_published.split_files("valid")]


@pytest.mark.slow  # a DataLoader worker process
def test_build_loaders_is_reproducible_and_has_test(store: Store, published: PublishedDataset,
                                                    tmp_path: Path) -> None:
    def first_epoch() -> list[torch.Tensor]:
        loaders = build_loaders(store, published, tmp_path / "cache", image_size=SIZE,
                                batch_size=4, workers=1, seed=7,
                                splits=("train", "valid", "test"))
        assert loaders.test is not None and len(loaders.test.dataset) == 8
        return [images for images, _ in loaders.train]

    first, second = first_epoch(), first_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_build_loaders_refuses_unknown_preset(local_store: LocalStore,
                                              local_published: PublishedDataset,
                                              tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--augment must be one of"):
        build_loaders(local_store, local_published, tmp_path / "cache", preset="heavy")
    assert not (tmp_path / "cache").exists()


def test_shard_sampler_covers_every_item_once() -> None:
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]


def test_build_eval_loader(local_store: LocalStore, local_published: PublishedDataset,
                           tmp_path: Path) -> None:
    loader = build_eval_loader(local_store, local_published, tmp_path / "cache",
                               split="test", image_size=SIZE, batch_size=5, workers=0)
    images, targets = next(iter(loader))
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert targets.tolist() == [e.label - 1 for e in local_published.split_files("test")[:5]]
    assert os.path.isdir(tmp_path / "cache" / DATASET / local_published.version / "test")


def test_distributed_train_sampler_and_whole_eval(local_store: LocalStore,
                                                  local_published: PublishedDataset,
                                                  tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler, SequentialSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        loaders = build_loaders(local_store, local_published, tmp_path / "cache",
                                image_size=SIZE, batch_size=4, workers=0, distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(loaders.train.sampler, DistributedSampler)
    assert isinstance(loaders.valid.sampler, SequentialSampler)
    assert sum(len(t) for _, t in loaders.train) == 8
