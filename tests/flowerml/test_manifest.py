"""flowerml.manifest on both stores: the writer's document read back, CURRENT, bad manifests."""

from __future__ import annotations

import hashlib
import json

import pytest

from flowerml.errors import DataError, DatasetNotFound
from flowerml.manifest import (
    ManifestEntry,
    PublishedDataset,
    resolve_dataset,
    write_current,
    write_manifest,
)
from flowerml.storage import LocalStore, Store

DATASET = "flowers102"


def test_resolves_current_and_explicit_version(store: Store, published: PublishedDataset) -> None:
    current = json.loads(store.get_bytes(f"datasets/{DATASET}/CURRENT"))
    assert published.version == current["version"]
    assert published.manifest_sha256 == current["manifest_sha256"]
    assert published.num_classes == 4
    assert published.class_names[0] == "pink primrose"
    train = published.split_files("train")
    assert len(train) == 8 and [e.key for e in train] == sorted(e.key for e in train)
    assert {e.split for e in train} == {"train"}
    assert resolve_dataset(store, DATASET, published.version) == published


def test_written_entries_are_read_back_typed(local_store: LocalStore) -> None:
    entries = [ManifestEntry("train", 2, "image_00007.jpg", "train/002/image_00007.jpg", 10,
                             "ab" * 32),
               ManifestEntry("test", 1, "image_00001.jpg", "test/001/image_00001.jpg", 12,
                             "cd" * 32)]
    raw = write_manifest(local_store, "tulips", "v1", ["red", "yellow"], entries,
                         quarantined=0, sources={})
    write_current(local_store, "tulips", "v1", raw)
    published = resolve_dataset(local_store, "tulips")
    assert published.files == tuple(entries)
    assert published.class_names == ("red", "yellow")
    assert published.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert json.loads(raw)["counts"] == {"train": 1, "valid": 0, "test": 1}


def test_unknown_version_is_not_published(store: Store, published: PublishedDataset) -> None:
    with pytest.raises(DatasetNotFound) as caught:
        resolve_dataset(store, DATASET, "0123456789ab")
    assert str(caught.value) == (f"dataset '{DATASET}' version '0123456789ab' is not published "
                                 f"on {store.uri} (run flowerml ingest)")
    with pytest.raises(DatasetNotFound, match="dataset 'tulips' version 'CURRENT' is not "
                                              "published on .* \\(run flowerml ingest\\)"):
        resolve_dataset(store, "tulips")


def test_refuses_a_manifest_that_differs_from_current(local_store: LocalStore,
                                                      local_published: PublishedDataset) -> None:
    key = f"datasets/{DATASET}/{local_published.version}/manifest.json"
    manifest = json.loads(local_store.get_bytes(key))
    manifest["files"] = manifest["files"][1:]
    local_store.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(DataError, match="manifest.json: sha256 .* differs from"):
        resolve_dataset(local_store, DATASET)


@pytest.mark.parametrize("bad_key", ["../../escape.jpg", "train/001/../../../x.jpg",
                                     "valid/001/image_00001.jpg"])
def test_refuses_manifest_keys_outside_the_split(local_store: LocalStore,
                                                 local_published: PublishedDataset,
                                                 bad_key: str) -> None:
    key = f"datasets/{DATASET}/{local_published.version}/manifest.json"
    manifest = json.loads(local_store.get_bytes(key))
    manifest["files"][0]["key"] = bad_key  # the first entry is a test image
    raw = json.dumps(manifest).encode()
    local_store.put_bytes(key, raw)
    local_store.put_bytes(f"datasets/{DATASET}/CURRENT", json.dumps(
        {"version": local_published.version,
         "manifest_sha256": hashlib.sha256(raw).hexdigest()}).encode())
    with pytest.raises(DataError, match="invalid file entry"):
        resolve_dataset(local_store, DATASET)


def test_refuses_names_that_could_escape(local_store: LocalStore) -> None:
    with pytest.raises(DataError, match="invalid dataset version '../x'"):
        resolve_dataset(local_store, DATASET, "../x")
