"""flowerml.data.manifest on both stores: the writer's document read back, CURRENT, bad manifests."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from flowerml.core.documents import DocumentError, plain
from flowerml.core.errors import DataError, DatasetNotFound
from flowerml.data.manifest import (
    DamagedManifest,
    Manifest,
    ManifestEntry,
    PublishedDataset,
    content_version,
    encode_json,
    read_current,
    read_manifest,
    read_quarantine,
    resolve_dataset,
    write_current,
    write_manifest,
)
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from tests.helpers.stored_documents import fixture_bytes

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
    version = content_version(entries, [], synthetic=False, class_names=["red", "yellow"])
    raw = write_manifest(local_store, "tulips", version, ["red", "yellow"], entries,
                         quarantined_images=[], sources={})
    write_current(local_store, "tulips", version, raw)
    published = resolve_dataset(local_store, "tulips")
    assert published.version == version and not published.synthetic
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
    with pytest.raises(DamagedManifest) as caught:
        resolve_dataset(local_store, DATASET)
    assert str(caught.value).startswith(f"{local_store.root}/{key}: field files.0.key: Value "
                                        "error, not a key under test/ ")


def test_refuses_names_that_could_escape(local_store: LocalStore) -> None:
    with pytest.raises(DataError, match="invalid dataset version '../x'"):
        resolve_dataset(local_store, DATASET, "../x")


def rewrite_manifest(store: LocalStore, version: str, change, rehash_current: bool = True) -> str:
    """Apply `change` to the version's manifest and (as an editor would) re-hash CURRENT;
    returns the manifest's full location."""
    key = f"datasets/{DATASET}/{version}/manifest.json"
    manifest = json.loads(store.get_bytes(key))
    change(manifest)
    raw = json.dumps(manifest).encode()
    store.put_bytes(key, raw)
    if rehash_current:
        store.put_bytes(f"datasets/{DATASET}/CURRENT", json.dumps(
            {"version": version, "manifest_sha256": hashlib.sha256(raw).hexdigest()}).encode())
    return f"{store.root}/{key}"


def relabel_first_train_image(manifest: dict) -> None:
    entry = next(e for e in manifest["files"] if e["split"] == "train")
    entry["label"] = entry["label"] % 4 + 1  # another class, with a key to match
    entry["key"] = f"train/{entry['label']:03d}/{entry['image']}"


def test_edited_labels_with_current_rehashed_are_refused(local_store: LocalStore,
                                                         local_published: PublishedDataset
                                                         ) -> None:
    where = rewrite_manifest(local_store, local_published.version, relabel_first_train_image)
    for version in (None, local_published.version):  # through CURRENT, and by name
        with pytest.raises(DataError) as caught:
            resolve_dataset(local_store, DATASET, version)
        assert str(caught.value).startswith(f"{where}: its entries hash to version ")
        assert f"not {local_published.version}" in str(caught.value)
        assert "\n" not in str(caught.value)


def test_synthetic_flag_is_read_and_cannot_be_edited_away(local_store: LocalStore,
                                                          local_published: PublishedDataset
                                                          ) -> None:
    assert local_published.synthetic  # the session's data is drawn by flowerml.data.synthetic
    where = rewrite_manifest(local_store, local_published.version,
                             lambda manifest: manifest.update(synthetic=False))
    with pytest.raises(DataError, match=f"^{re.escape(where)}: its entries hash to version"):
        resolve_dataset(local_store, DATASET)


def test_class_names_of_ones_own_are_part_of_the_version(local_store: LocalStore) -> None:
    entries = [ManifestEntry("test", 1, "a.jpg", "test/001/a.jpg", 12, "cd" * 32)]
    flowers_version = content_version(entries, [], False, ["pink primrose"])
    assert flowers_version == content_version(entries, [], False)  # Flowers-102 ids as before
    red = content_version(entries, [], False, ["red"])
    assert len({flowers_version, red, content_version(entries, [], False, ["blue"])}) == 3
    raw = write_manifest(local_store, "tulips", red, ["red"], entries, quarantined_images=[],
                         sources={})
    edited = json.loads(raw)
    edited["classes"][0]["name"] = "blue"  # renamed after publishing: no longer this version
    local_store.put_bytes(f"datasets/tulips/{red}/manifest.json", json.dumps(edited).encode())
    with pytest.raises(DataError, match=f"its entries hash to version .*, not {red}"):
        resolve_dataset(local_store, "tulips", red)


def test_older_manifest_without_quarantine_names_reads_quarantine_json(
        local_store: LocalStore) -> None:
    entries = [ManifestEntry("test", 1, "image_00001.jpg", "test/001/image_00001.jpg", 12,
                             "cd" * 32)]
    version = content_version(entries, ["image_00002.jpg"], synthetic=False,
                              class_names=["red"])
    raw = write_manifest(local_store, "tulips", version, ["red"], entries,
                         quarantined_images=["image_00002.jpg"], sources={})
    manifest = json.loads(raw)
    del manifest["quarantined_images"], manifest["synthetic"]  # as written before they existed
    key = f"datasets/tulips/{version}/manifest.json"
    local_store.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(DataError, match="quarantine.json: missing, and the manifest does not"):
        resolve_dataset(local_store, "tulips", version)
    local_store.put_bytes(f"datasets/tulips/{version}/quarantine.json", json.dumps(
        [{"image": "image_00002.jpg", "split": "train", "label": 1, "reason": "bad"}]).encode())
    assert resolve_dataset(local_store, "tulips", version).files == tuple(entries)


# --------------------------------------------------------------------------------------------
# The manifest document


def test_manifest_round_trips_byte_for_byte() -> None:
    raw = fixture_bytes("manifest.json")  # as the writer before the pydantic model wrote it
    manifest = read_manifest("manifest.json", raw)
    assert isinstance(manifest, Manifest) and manifest.synthetic
    assert manifest.files[1] == ManifestEntry("train", 2, "image_00007.jpg",
                                              "train/002/image_00007.jpg", 10, "ab" * 32)
    assert encode_json(plain(manifest)) == raw


def test_a_manifest_from_before_synthetic_and_quarantine_names_still_reads() -> None:
    old = json.loads(fixture_bytes("manifest.json"))
    del old["synthetic"], old["quarantined_images"]
    manifest = read_manifest("manifest.json", json.dumps({**old, "parent": "x"}).encode())
    assert manifest.synthetic is False and manifest.quarantined_images is None
    assert plain(manifest)["parent"] == "x"  # a newer writer's field is kept


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m["files"][1].update(sha256="zz"),
     "files.1.sha256: String should match pattern '^[0-9a-f]{64}$' (got 'zz')"),
    (lambda m: m["files"][0].update(label="1"), "files.0.label: Input should be a valid "
                                                "integer (got '1')"),
    (lambda m: m["files"][0].update(split="tests"), "files.0.split: Input should be 'train', "
                                                    "'valid' or 'test' (got 'tests')"),
    (lambda m: m["files"][0].pop("size"), "files.0.size: Field required"),
    (lambda m: m.update(synthetic="yes"), "synthetic: Input should be a valid boolean "
                                          "(got 'yes')"),
    (lambda m: m["classes"][1].update(label=3), "classes: Value error, labels are not 1..2"),
])
def test_an_edited_manifest_field_is_one_line_naming_file_and_field(change, field: str) -> None:
    manifest = json.loads(fixture_bytes("manifest.json"))
    change(manifest)
    where = "datasets/tulips/cea5957a5b08/manifest.json"
    with pytest.raises(DamagedManifest) as caught:
        read_manifest(where, json.dumps(manifest).encode())
    assert str(caught.value) == f"{where}: field {field}"
    assert isinstance(caught.value, DocumentError) and isinstance(caught.value, DataError)


def test_a_label_beyond_the_classes_names_its_entry(local_store: LocalStore) -> None:
    manifest = json.loads(fixture_bytes("manifest.json"))
    manifest["files"][1].update(label=3, key="train/003/image_00007.jpg")
    raw = json.dumps(manifest).encode()
    local_store.put_bytes(f"datasets/tulips/{manifest['version']}/manifest.json", raw)
    with pytest.raises(DamagedManifest) as caught:
        resolve_dataset(local_store, "tulips", manifest["version"])
    assert str(caught.value) == (f"{local_store.root}/datasets/tulips/{manifest['version']}/"
                                 "manifest.json: field files.1.label: 3 is not a label of the "
                                 "manifest's 2 classes")


def test_manifest_entries_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="not a key under train/"):
        ManifestEntry("train", 1, "x.jpg", "train/../../x.jpg", 1, "ab" * 32)


# --------------------------------------------------------------------------------------------
# CURRENT and quarantine.json


def test_current_and_quarantine_written_before_their_models_read_and_round_trip(
        local_store: LocalStore) -> None:
    local_store.put_bytes("datasets/tulips/CURRENT", fixture_bytes("CURRENT.json"))
    current = read_current(local_store, "tulips")
    assert encode_json(current) == fixture_bytes("CURRENT.json")
    quarantine = read_quarantine("quarantine.json", fixture_bytes("quarantine.json"))
    assert encode_json([plain(item) for item in quarantine]) == fixture_bytes("quarantine.json")


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"version": 7}', "version: Input should be a valid string (got 7)"),
    (b'{"version": "abc", "manifest_sha256": "x"}',
     "manifest_sha256: String should match pattern '^[0-9a-f]{64}$' (got 'x')"),
    (b'{"manifest_sha256": null}', "version: Field required"),
])
def test_an_edited_current_is_one_line_naming_file_and_field(local_store: LocalStore, raw: bytes,
                                                             field: str) -> None:
    local_store.put_bytes("datasets/tulips/CURRENT", raw)
    with pytest.raises(DamagedManifest) as caught:
        resolve_dataset(local_store, "tulips")
    assert str(caught.value) == f"datasets/tulips/CURRENT: field {field}"


def test_an_edited_quarantine_json_is_one_line_naming_file_and_field() -> None:
    entries = json.loads(fixture_bytes("quarantine.json"))
    entries[0]["label"] = "one"
    with pytest.raises(DamagedManifest) as caught:
        read_quarantine("datasets/tulips/v/quarantine.json", json.dumps(entries).encode())
    assert str(caught.value) == ("datasets/tulips/v/quarantine.json: field 0.label: Input should "
                                 "be a valid integer (got 'one')")
