"""Fixtures of the library tests, all built from the session's `synthetic_data`: the small
archive published on a test's store, and one tiny trained run (copied, or registered)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from flowerml.manifest import PublishedDataset, resolve_dataset
from flowerml.recipes import TrainConfig, build_config
from flowerml.registry import Registry
from flowerml.storage import Store
from flowerml.storage_local import LocalStore
from flowerml.synthetic import SyntheticSpec
from tests.conftest import DATASET, SMALL_SPEC, StoreAndCache, SyntheticData, copy_tree

TINY_SPEC = SyntheticSpec(classes=4, per_class=12, image_size=56, seed=5)
"""The archive of the tiny run: 4 classes x 12 images (3 train, 3 valid, 6 test), 56 px."""

TINY_RUN = "tiny"


def tiny_config() -> TrainConfig:
    """The tiny run's training: the demo recipe (ResNet-18, no weights), one epoch at 40 px."""
    return build_config("demo", epochs=1, image_size=40, batch_size=8)


def publish_copy(pristine_store: Path, store: Store) -> PublishedDataset:
    """The pristine store's objects on `store` (hard links for a LocalStore, uploads to S3),
    each dataset's manifest.json and CURRENT last, as ingest writes them."""
    if isinstance(store, LocalStore):
        copy_tree(pristine_store, store.root)
    else:
        def order(key: str) -> tuple[int, str]:
            return {"manifest.json": 1, "CURRENT": 2}.get(key.rsplit("/", 1)[-1], 0), key

        for key in sorted((info.key for info in LocalStore(pristine_store).list("")), key=order):
            store.put_file(key, pristine_store / key)
    return resolve_dataset(store, DATASET)


@pytest.fixture
def published(store: Store, synthetic_data: SyntheticData) -> PublishedDataset:
    """The small synthetic dataset published on `store` (LocalStore and moto S3)."""
    return publish_copy(synthetic_data.published(SMALL_SPEC) / "store", store)


@pytest.fixture
def local_published(local_store: LocalStore, synthetic_data: SyntheticData) -> PublishedDataset:
    """The small synthetic dataset published on `local_store`."""
    return publish_copy(synthetic_data.published(SMALL_SPEC) / "store", local_store)


@pytest.fixture(scope="module")
def tiny_run(synthetic_data: SyntheticData,
             tmp_path_factory: pytest.TempPathFactory) -> StoreAndCache:
    """A module's own store holding the tiny dataset and the trained, not yet evaluated run
    `tiny`, and its cache (a copy: the module may change it)."""
    pristine = synthetic_data.trained(TINY_SPEC, TINY_RUN, tiny_config())
    return synthetic_data.copy(pristine, tmp_path_factory.mktemp("tiny-run"))


class RegisteredRun(NamedTuple):
    store: LocalStore
    cache: Path
    registry: Registry
    metrics: dict


@pytest.fixture(scope="session")
def registered_run(synthetic_data: SyntheticData,
                   tmp_path_factory: pytest.TempPathFactory) -> RegisteredRun:
    """The tiny run evaluated, registered as flowers102:1 and made production (read-only)."""
    from flowerml.inference import evaluate_run
    from flowerml.release import build_card, register_run

    pristine = synthetic_data.trained(TINY_SPEC, TINY_RUN, tiny_config())
    store, cache = synthetic_data.copy(pristine, tmp_path_factory.mktemp("registered-run"))
    metrics = evaluate_run(store, TINY_RUN, cache_dir=cache, device="cpu",
                           workers=0).metrics.summary()
    registry = Registry(store, DATASET)
    card = build_card(store, TINY_RUN, metrics, promote=True, reasons=["test"],
                      gate={"threshold": 0.0, "tolerance": 0.0, "force": True})
    version = register_run(registry, store, TINY_RUN, card)
    registry.set_alias("production", version.version, reason="test", forced=True)
    return RegisteredRun(store, cache, registry, metrics)
