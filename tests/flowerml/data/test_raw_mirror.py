"""flowerml.data.raw_mirror: the publish step reads the raw files from the local cache, pulls them
from the store's mirror when the cache lacks them, and refuses a mirrored file whose MD5 is not
the one sources.json records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.core.errors import SourceError
from flowerml.core.files import md5_file
from flowerml.data import flowers
from flowerml.data.ingest import fetch_sources, publish_split
from flowerml.data.manifest import encode_json
from flowerml.data.raw_mirror import (
    DamagedSourcesRecord,
    mirror_sources,
    raw_key,
    read_sources_record,
)
from flowerml.data.source_files import FetchOptions
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from tests.helpers.stored_documents import fixture_bytes
from tests.helpers.stores import store_keys


def test_publish_in_a_fresh_cache_pulls_raw_from_the_store(s3_store: S3Store, tmp_path: Path,
                                                           synthetic_source: Path) -> None:
    fetch_sources(str(synthetic_source), s3_store, "flowers102", tmp_path / "a", FetchOptions())
    result = publish_split(s3_store, "flowers102", tmp_path / "b", workers=2)
    assert result.uploaded == 24
    assert (tmp_path / "b" / "flowers102" / "raw" / flowers.ARCHIVE).read_bytes() == (
        synthetic_source / flowers.ARCHIVE).read_bytes()


def test_a_mirrored_file_that_differs_from_sources_json_is_refused(
        local_store: LocalStore, tmp_path: Path, synthetic_source: Path) -> None:
    fetch_sources(str(synthetic_source), local_store, "flowers102", tmp_path / "a",
                  FetchOptions())
    labels = raw_key("flowers102", flowers.LABELS)
    local_store.put_bytes(labels, b"edited since the fetch")
    with pytest.raises(SourceError) as err:
        publish_split(local_store, "flowers102", tmp_path / "b")
    assert str(err.value) == (f"{local_store.root}/{labels}: MD5 differs from sources.json")
    assert not (tmp_path / "b" / "flowers102" / "raw" / flowers.LABELS).exists()
    assert not any(key.endswith(("manifest.json", "CURRENT")) for key in store_keys(local_store))


# --------------------------------------------------------------------------------------------
# sources.json, the mirror's record


def test_sources_json_as_written_before_its_model_reads_back_byte_for_byte(
        local_store: LocalStore) -> None:
    local_store.put_bytes(raw_key("flowers102", "sources.json"), fixture_bytes("sources.json"))
    record = read_sources_record(local_store, "flowers102")
    assert record is not None and record["verified"] is True
    assert encode_json(record) == fixture_bytes("sources.json")


def test_mirror_sources_writes_what_its_reader_reads(local_store: LocalStore,
                                                     tmp_path: Path) -> None:
    local = {}
    for name in flowers.SOURCE_FILES:
        local[name] = tmp_path / name
        local[name].write_bytes(name.encode())
    md5s = {name: md5_file(path) for name, path in local.items()}
    written = mirror_sources(local_store, "tulips", None, local, md5s, "/data/tulips", False)
    assert read_sources_record(local_store, "tulips") == written
    assert written["files"]["setid.mat"] == {"md5": md5s["setid.mat"], "size": 9}


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r["files"]["setid.mat"].update(md5="zz"), "field files.setid.mat.md5: String "
     "should match pattern '^[0-9a-f]{32}$' (got 'zz')"),
    (lambda r: r["files"]["imagelabels.mat"].pop("size"), "field files.imagelabels.mat.size: "
     "Field required"),
    (lambda r: r.update(verified="yes"), "field verified: Input should be a valid boolean "
     "(got 'yes')"),
])
def test_an_edited_sources_json_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                                  change, problem: str) -> None:
    record = json.loads(fixture_bytes("sources.json"))
    change(record)
    key = raw_key("flowers102", "sources.json")
    local_store.put_bytes(key, json.dumps(record).encode())
    with pytest.raises(DamagedSourcesRecord) as caught:
        read_sources_record(local_store, "flowers102")
    assert str(caught.value) == f"{local_store.root}/{key}: {problem}"
    assert isinstance(caught.value, SourceError)
