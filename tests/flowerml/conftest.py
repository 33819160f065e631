"""Fixtures of the data tests: the synthetic archive ingested, its current version resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.ingest import FetchOptions, ingest
from flowerml.manifest import PublishedDataset, resolve_dataset
from flowerml.storage import LocalStore, Store

DATASET = "flowers102"


def publish(store: Store, source: Path, cache: Path) -> PublishedDataset:
    ingest(str(source), store, DATASET, cache, FetchOptions())
    return resolve_dataset(store, DATASET)


@pytest.fixture
def published(store: Store, synthetic_source: Path, tmp_path: Path) -> PublishedDataset:
    """The synthetic dataset published on both stores (LocalStore and moto S3)."""
    return publish(store, synthetic_source, tmp_path / "ingest-cache")


@pytest.fixture
def local_published(local_store: LocalStore, synthetic_source: Path,
                    tmp_path: Path) -> PublishedDataset:
    """The synthetic dataset published on `local_store`."""
    return publish(local_store, synthetic_source, tmp_path / "ingest-cache")
