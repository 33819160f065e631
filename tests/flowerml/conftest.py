"""Fixtures of the library tests, all built from the session's `synthetic_data`: the small
archive published on a test's store, and a module's own copy of the tiny trained run (the
registered one, `registered_run`, is in tests/conftest.py: the flow tests use it too); and for
the download tests, a scripted HTTP file server and flowerml.io.download's backoff delays."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from tests.helpers.http_files import Server, record_download_sleeps, scripted_server
from tests.helpers.stores import StoreAndCache
from tests.helpers.synthetic import (
    SMALL_SPEC,
    TINY_RUN,
    TINY_SPEC,
    SyntheticData,
    publish_copy,
    tiny_config,
)


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


@pytest.fixture
def http_server() -> Iterator[Server]:
    """A scripted HTTP file server on 127.0.0.1 (tests/helpers/http_files.py)."""
    with scripted_server() as server:
        yield server


@pytest.fixture
def download_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every backoff delay flowerml.io.download sleeps, in order (still slept: tiny with FAST)."""
    return record_download_sleeps(monkeypatch)
