"""flowerml.io.storage_open: the store a URI names, and what is refused as one."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.io.locations import LocationError
from flowerml.io.storage import S3Options
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_open import open_store
from flowerml.io.storage_s3 import S3Store


def test_open_store_parses_uris(tmp_path: Path, s3_options: S3Options) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", s3=s3_options)
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    assert s3.uri == "s3://bucket/some/prefix"


@pytest.mark.parametrize(("uri", "problem"), [
    ("ftp://example.org/store", "uses an unsupported scheme (ftp://)"),
    ("s3://Bad_Bucket!/x", "has an invalid bucket name"),
    ("s3://", "has no bucket name"),
    ("", "must not be empty"),
])
def test_open_store_refuses_what_is_not_a_store(uri: str, problem: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError) as err:
        open_store(uri, name="FLOWERML_STORE")
    assert str(err.value).startswith("FLOWERML_STORE ") and problem in str(err.value)
    assert "file://PATH or s3://bucket[/prefix]" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no folder named after the bad value
