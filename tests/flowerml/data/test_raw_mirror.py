"""flowerml.data.raw_mirror: the publish step reads the raw files from the local cache, pulls them
from the store's mirror when the cache lacks them, and refuses a mirrored file whose MD5 is not
the one sources.json records."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.core.errors import SourceError
from flowerml.data import flowers
from flowerml.data.ingest import fetch_sources, publish_split
from flowerml.data.raw_mirror import raw_key
from flowerml.data.source_files import FetchOptions
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
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
