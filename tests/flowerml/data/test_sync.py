"""flowerml.data.sync on both stores: the verified sync of a split to the local cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.core.errors import DataError
from flowerml.data import sync
from flowerml.data.manifest import ManifestEntry, PublishedDataset
from flowerml.data.sync import sync_split
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from tests.helpers.stores import Recorder, count_downloads

DATASET = "flowers102"


def image_key(published: PublishedDataset, entry: ManifestEntry) -> str:
    return f"datasets/{DATASET}/{published.version}/{entry.key}"


def test_sync_downloads_everything_once(store: Store, published: PublishedDataset,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = count_downloads(store, monkeypatch)
    progress = Recorder()
    root = sync_split(store, published, ("train", "valid"), tmp_path / "cache", progress=progress)
    assert root == tmp_path / "cache" / DATASET / published.version
    wanted = published.split_files("train") + published.split_files("valid")
    assert sorted(downloads) == sorted(image_key(published, e) for e in wanted)
    assert progress.stages == [("downloading train", 8), ("downloading valid", 8)]
    for entry in wanted:
        assert (root / entry.key).read_bytes() == store.get_bytes(image_key(published, entry))
    assert not (root / "test").exists()

    downloads.clear()
    hashed = []
    original_hash = sync.sha256_file
    monkeypatch.setattr(sync, "sha256_file", lambda path: hashed.append(path) or original_hash(path))
    again = Recorder()
    sync_split(store, published, ("train", "valid"), tmp_path / "cache", progress=again)
    assert downloads == [] and hashed == [] and again.stages == []


def test_sync_rechecks_a_changed_local_file(local_store: LocalStore,
                                            local_published: PublishedDataset, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    entry = local_published.split_files("train")[3]
    path = root / entry.key
    original = path.read_bytes()
    path.write_bytes(bytes(len(original)))  # same size, other bytes
    downloads = count_downloads(local_store, monkeypatch)
    progress = Recorder()
    sync_split(local_store, local_published, ["train"], tmp_path / "cache", progress=progress)
    assert downloads == [image_key(local_published, entry)]
    assert progress.stages == [("verifying train", 1), ("downloading train", 1)]
    assert path.read_bytes() == original


def test_sync_without_a_stamp_hashes_instead_of_downloading(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["valid"], tmp_path / "cache")
    sync.stamp_path(root, "valid").unlink()
    downloads = count_downloads(local_store, monkeypatch)
    progress = Recorder()
    sync_split(local_store, local_published, ["valid"], tmp_path / "cache", progress=progress)
    assert downloads == [] and progress.stages == [("verifying valid", 8)]
    assert sync.stamp_path(root, "valid").is_file()


def test_altered_image_on_the_store_is_refused(store: Store, published: PublishedDataset,
                                               tmp_path: Path) -> None:
    entry = published.split_files("train")[2]
    other = published.split_files("train")[5]
    store.put_bytes(image_key(published, entry), store.get_bytes(image_key(published, other)))
    with pytest.raises(DataError) as caught:
        sync_split(store, published, ["train"], tmp_path / "cache")
    assert str(caught.value).startswith(
        f"{image_key(published, entry)}: sha256 mismatch: the store does not match the manifest")
    root = tmp_path / "cache" / DATASET / published.version
    assert not (root / entry.key).exists()
    assert (root / other.key).is_file()
    with pytest.raises(DataError, match="sha256 mismatch"):  # and again: never trusted later
        sync_split(store, published, ["train"], tmp_path / "cache")
    assert not (root / entry.key).exists()


def test_missing_image_on_the_store_is_named(store: Store, published: PublishedDataset,
                                             tmp_path: Path) -> None:
    entry = published.split_files("valid")[0]
    store.delete(image_key(published, entry))
    with pytest.raises(DataError, match=f"{image_key(published, entry)}: not found .* "
                                        "the published version is incomplete"):
        sync_split(store, published, ["valid"], tmp_path / "cache")
    assert not (tmp_path / "cache" / DATASET / published.version / entry.key).exists()


def test_unknown_split_is_refused(local_store: LocalStore, local_published: PublishedDataset,
                                  tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'training'"):
        sync_split(local_store, local_published, ["training"], tmp_path / "cache")


