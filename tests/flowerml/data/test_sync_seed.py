"""flowerml.data.sync_seed: a publish leaves its images in the local copy a sync keeps, so the
host that ingested trains without downloading or hashing them again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowerml.data import sync, sync_seed
from flowerml.data.ingest import IngestResult, ingest
from flowerml.data.manifest import resolve_dataset
from flowerml.data.source_files import FetchOptions
from flowerml.data.sync import sync_split
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from tests.helpers.stores import Recorder, count_downloads
from tests.helpers.synthetic import DATASET

SPLITS = ("train", "valid", "test")


def run_ingest(source: Path, store: Store, cache: Path) -> IngestResult:
    return ingest(str(source), store, DATASET, cache, FetchOptions())


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    hashed: list[Path] = []
    original = sync.sha256_file
    monkeypatch.setattr(sync, "sha256_file", lambda path: hashed.append(path) or original(path))
    return hashed


def test_the_ingesting_host_syncs_without_downloading_or_hashing(
        store: Store, synthetic_source: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    result = run_ingest(synthetic_source, store, cache)
    published = resolve_dataset(store, DATASET, result.version)
    downloads, hashed, progress = count_downloads(store, monkeypatch), count_hashes(
        monkeypatch), Recorder()
    root = sync_split(store, published, SPLITS, cache, progress=progress)
    assert (downloads, hashed, progress.stages) == ([], [], [])
    for entry in published.files:
        assert (root / entry.key).read_bytes() == store.get_bytes(published.object_key(entry))
        assert (root / entry.key).stat().st_nlink == 2  # a link to the staged image, no copy


def test_a_seeded_image_written_to_afterwards_is_hashed_and_fetched_again(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    published = resolve_dataset(local_store, DATASET,
                                run_ingest(synthetic_source, local_store, cache).version)
    entry = published.split_files("train")[2]
    path = sync.version_root(cache, DATASET, published.version) / entry.key
    original = path.read_bytes()
    with path.open("r+b") as file:  # in place: the staged file it links to changes too
        file.write(bytes(16))
    downloads, progress = count_downloads(local_store, monkeypatch), Recorder()
    sync_split(local_store, published, ["train"], cache, progress=progress)
    assert downloads == [published.object_key(entry)]
    assert progress.stages == [("verifying train", 1), ("downloading train", 1)]
    assert path.read_bytes() == original


def test_where_no_link_can_be_made_the_sync_fetches_as_before(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    link = os.link

    def cross_device(source: Path, target: Path) -> None:
        if Path(target).is_relative_to(cache / DATASET) and "raw" not in Path(target).parts:
            raise OSError(18, "Invalid cross-device link")
        link(source, target)

    monkeypatch.setattr(sync_seed.os, "link", cross_device)
    result = run_ingest(synthetic_source, local_store, cache)
    assert (result.uploaded, result.quarantined) == (24, 0)
    monkeypatch.setattr(sync_seed.os, "link", link)
    published = resolve_dataset(local_store, DATASET, result.version)
    root = sync.version_root(cache, DATASET, published.version)
    assert not any(sync.stamp_path(root, split).exists() for split in SPLITS)
    downloads = count_downloads(local_store, monkeypatch)
    sync_split(local_store, published, SPLITS, cache)
    assert sorted(downloads) == sorted(published.object_key(e) for e in published.files)


def test_a_version_already_published_seeds_nothing(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path) -> None:
    first = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    run_ingest(synthetic_source, local_store, tmp_path / "other-cache")
    assert not (tmp_path / "other-cache" / DATASET / first.version).exists()
