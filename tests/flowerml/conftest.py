"""Fixtures of the library tests, all built from the session's `synthetic_data`: the small
archive published on a test's store, and a module's own copy of the tiny trained run (the
registered one, `registered_run`, is in tests/conftest.py: the flow tests use it too); and for
the download tests, a scripted HTTP file server and flowerml.io.download's backoff delays."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from tests.helpers.http_files import Server, record_download_sleeps, scripted_server
from tests.helpers.registries import ExportedRegistry, export_registry_copy, own_registry
from tests.helpers.scoring import write_photos
from tests.helpers.stores import StoreAndCache
from tests.helpers.synthetic import (
    SMALL_SPEC,
    TINY_RUN,
    TINY_SPEC,
    RegisteredRun,
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


# Scoring a registered, exported model (tests/flowerml/serving/test_scoring*.py, cli/test_score.py)


@pytest.fixture(scope="module")
def exported_registry(registered_run: RegisteredRun,
                      tmp_path_factory: pytest.TempPathFactory) -> ExportedRegistry:
    """The session's registered run, exported to ONNX, once per module (a copy it may change)."""
    return export_registry_copy(registered_run, tmp_path_factory.mktemp("exported-registry"))


@pytest.fixture
def registry(exported_registry: ExportedRegistry, tmp_path: Path) -> Registry:
    """The exported registry on a store of the test's own."""
    return own_registry(exported_registry, tmp_path / "registry-store")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of photos to score (tests/helpers/scoring.py)."""
    return write_photos(tmp_path_factory.mktemp("photos"))
