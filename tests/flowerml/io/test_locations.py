"""flowerml.io.locations: one parser for sources and stores, the same schemes, one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.core.errors import UserError
from flowerml.io.locations import (
    SOURCE_FORMS,
    STORE_FORMS,
    ImageFolderLocation,
    LocalLocation,
    LocationError,
    OfficialLocation,
    S3Location,
    UrlLocation,
    bucket_name_problem,
    parse_source,
    parse_store,
)

# --- what both accept ----------------------------------------------------------------------


@pytest.mark.parametrize("parse", [parse_source, parse_store])
@pytest.mark.parametrize(("value", "expected"), [
    ("/srv/flowers", LocalLocation(Path("/srv/flowers"))),
    ("relative/dir", LocalLocation(Path("relative/dir"))),
    ("  /srv/flowers  ", LocalLocation(Path("/srv/flowers"))),
    ("data:2024", LocalLocation(Path("data:2024"))),  # a colon, but no "://": a folder
    ("file:///srv/flowers", LocalLocation(Path("/srv/flowers"))),
    ("file://localhost/srv/flowers", LocalLocation(Path("/srv/flowers"))),
    ("file:///srv/my%20flowers", LocalLocation(Path("/srv/my flowers"))),
    ("file://./store", LocalLocation(Path("./store"))),
    ("FILE:///srv/flowers", LocalLocation(Path("/srv/flowers"))),
    ("s3://bucket", S3Location("bucket", "")),
    ("s3://bucket/", S3Location("bucket", "")),
    ("s3://my.bucket-01/some/prefix/", S3Location("my.bucket-01", "some/prefix")),
])
def test_sources_and_stores_take_the_same_forms(parse, value: str, expected) -> None:
    assert parse(value) == expected


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_store("~/store") == LocalLocation(tmp_path / "store")
    assert parse_source("file://~/src") == LocalLocation(tmp_path / "src")


def test_s3_location_uri() -> None:
    assert S3Location("bucket", "a/b").uri == "s3://bucket/a/b"
    assert S3Location("bucket").uri == "s3://bucket"


def test_sources_also_take_official_and_http_urls() -> None:
    assert parse_source("official") == OfficialLocation()
    assert parse_source("https://mirror.example/flowers/") == UrlLocation(
        "https://mirror.example/flowers/")
    assert parse_source("http://127.0.0.1:8080/x") == UrlLocation("http://127.0.0.1:8080/x")
    assert UrlLocation("https://u:secret@h/x?sig=1").shown == "https://h/x?<redacted>"


# --- what is refused, with one line naming the accepted forms -----------------------------


@pytest.mark.parametrize(("value", "problem"), [
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("ftp://example.org/flowers", "'ftp://example.org/flowers' uses an unsupported scheme "
                                  "(ftp://)"),
    ("gs://bucket/x", "'gs://bucket/x' uses an unsupported scheme (gs://)"),
    ("s3://", "'s3://' has no bucket name"),
    ("s3:///prefix", "'s3:///prefix' has no bucket name"),
    ("https://", "'https://' has no host"),
    ("http:///flowers", "'http:///flowers' has no host"),
    ("https://example.org:99999/x", "has an invalid port (ports are 1-65535)"),
    ("file://", "'file://' has no path after file://"),
])
def test_a_bad_source_is_refused_naming_the_accepted_forms(value: str, problem: str) -> None:
    with pytest.raises(LocationError) as err:
        parse_source(value, "--source")
    message = str(err.value)
    assert message.startswith("--source ")
    assert problem in message
    assert message.endswith(SOURCE_FORMS)
    assert "\n" not in message
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize(("value", "problem"), [
    ("", "must not be empty"),
    ("ftp://example.org/x", "uses an unsupported scheme (ftp://)"),
    ("https://example.org/x", "uses an unsupported scheme (https://)"),  # sources only
    ("official", None),  # a store named "official" is a folder
    ("s3://", "has no bucket name"),
    ("s3://Bad_Bucket!/x", "has an invalid bucket name: S3 bucket names are 3-63 characters"),
    ("s3://bucket/a/../b", "has an invalid prefix"),
    ("s3://bucket/a//b", "has an invalid prefix"),
])
def test_a_bad_store_is_refused_naming_the_accepted_forms(value: str, problem: str | None):
    if problem is None:
        assert parse_store(value) == LocalLocation(Path(value))
        return
    with pytest.raises(LocationError) as err:
        parse_store(value, "--store")
    assert str(err.value).startswith("--store ")
    assert problem in str(err.value)
    assert str(err.value).endswith(STORE_FORMS)
    assert err.value.detail == str(err.value).removeprefix("--store ")


def test_credentials_in_a_refused_value_are_not_repeated() -> None:
    with pytest.raises(LocationError) as err:
        parse_source("ftp://alice:s3cr3t@example.org/x")
    assert "s3cr3t" not in str(err.value) and "alice" not in str(err.value)
    assert "ftp://example.org/x" in str(err.value)


@pytest.mark.parametrize("bucket", ["abc", "my-bucket", "my.bucket.01", "a" * 63,
                                    "bucket-s3alias"])
def test_valid_bucket_names(bucket: str) -> None:
    assert bucket_name_problem(bucket) is None


@pytest.mark.parametrize("bucket", ["ab", "a" * 64, "Bad_Bucket!", "UPPER", "under_score",
                                    "-leading", "trailing-", ".dot", "two..dots",
                                    "192.168.1.1", "space d"])
def test_invalid_bucket_names(bucket: str) -> None:
    assert "S3 bucket names are 3-63 characters" in bucket_name_problem(bucket)


# --- imagefolder:PATH, a dataset of one's own classes (sources only) ------------------------


@pytest.mark.parametrize(("value", "root", "uri"), [
    ("imagefolder:/srv/mine", LocalLocation(Path("/srv/mine")), "/srv/mine"),
    ("imagefolder:file:///srv/mine", LocalLocation(Path("/srv/mine")), "/srv/mine"),
    ("imagefolder:s3://my-bucket/plants/", S3Location("my-bucket", "plants"),
     "s3://my-bucket/plants"),
])
def test_imagefolder_names_a_folder_or_prefix(value: str, root: object, uri: str) -> None:
    assert parse_source(value) == ImageFolderLocation(root, value)
    assert parse_source(value).uri == uri


@pytest.mark.parametrize(("value", "problem"), [
    ("imagefolder:", "'imagefolder:' has no folder after imagefolder:"),
    ("imagefolder:s3://", "'s3://' has no bucket name"),
    ("imagefolder:https://host/x", "'https://host/x' uses an unsupported scheme (https://)"),
])
def test_imagefolder_without_a_folder_is_refused(value: str, problem: str) -> None:
    with pytest.raises(LocationError) as refused:
        parse_source(value, "--source")
    assert str(refused.value) == f"--source {problem}; {SOURCE_FORMS}"


def test_a_store_named_imagefolder_is_a_local_folder() -> None:
    assert parse_store("imagefolder:x") == LocalLocation(Path("imagefolder:x"))
