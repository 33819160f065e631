"""The test split prepared while training runs: synced and decoded as the run will be
evaluated, so that the evaluation decodes nothing; skipped where no thread can idle alone."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowerml.evaluation.ahead
from flowerml.core.priority import idle_priority_available
from flowerml.data.manifest import resolve_dataset
from flowerml.evaluation.ahead import prepare_evaluation_split
from flowerml.evaluation.inference import evaluate_run
from flowerml.io.storage_local import LocalStore
from flowerml.training.runs import RunFiles
from tests.helpers.decodes import record_decodes
from tests.helpers.stores import StoreAndCache, copy_tree


def own_store(tiny_run: StoreAndCache, tmp_path: Path) -> LocalStore:
    return LocalStore(copy_tree(tiny_run.store.root, tmp_path / "store"))


def prepare(store: LocalStore, cache: Path):
    record = RunFiles(store, "tiny").record()
    config = record.config
    return prepare_evaluation_split(store, record.dataset.name, record.dataset.version, cache,
                                    arch=config.arch, weights=config.weights,
                                    image_size=config.image_size)


@pytest.mark.skipif(not idle_priority_available(), reason="per-thread scheduling is Linux's")
def test_the_evaluation_reads_the_prepared_split_and_decodes_nothing(
        tiny_run: StoreAndCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, cache = own_store(tiny_run, tmp_path), tmp_path / "cache"  # an empty cache
    prepared = prepare(store, cache)
    dataset = RunFiles(store, "tiny").record().dataset
    test_images = len(resolve_dataset(store, dataset.name, dataset.version).split_files("test"))
    assert prepared.skipped is None
    assert prepared.split == "test" and prepared.decoded == prepared.images == test_images > 0
    decodes = record_decodes(monkeypatch)
    evaluation = evaluate_run(store, "tiny", cache_dir=cache, device="cpu", workers=0)
    assert decodes == []
    assert evaluation.metrics.summary()["n"] == prepared.images
    assert prepare(store, cache).decoded == 0  # prepared again: the cache is reused


def test_nothing_is_prepared_where_a_thread_cannot_idle_alone(
        tiny_run: StoreAndCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowerml.evaluation.ahead, "idle_priority_available", lambda: False)
    store, cache = own_store(tiny_run, tmp_path), tmp_path / "cache"
    prepared = prepare(store, cache)
    assert prepared.decoded == 0 and prepared.images == 0
    assert "no per-thread idle priority" in prepared.skipped
    assert not cache.exists()
