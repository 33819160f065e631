"""flowerml.data.source_files through ingest: each form of source (a folder, file://, s3://, an
http(s) URL, the official site), what is refused before anything is written (no accepted form,
a file, a missing folder or bucket, an HTML page, an unknown host) and a refused connection
retried briefly."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerml.core.errors import ArchiveError, DownloadRetriesExhausted, SourceError
from flowerml.data import flowers
from flowerml.data.ingest import IngestResult, ingest
from flowerml.data.source_files import FetchOptions
from flowerml.io import download
from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.network import free_port
from tests.helpers.stores import store_keys


def run_ingest(source: Path | str, store: Store, cache: Path, **options) -> IngestResult:
    return ingest(str(source), store, "flowers102", cache, FetchOptions(**options))


def test_s3_source_prefix(s3_store: S3Store, local_store: LocalStore, synthetic_source: Path,
                          tmp_path: Path) -> None:
    for name in flowers.SOURCE_FILES:
        s3_store.put_file(f"mirror/{name}", synthetic_source / name)
    uri = f"{s3_store.uri}/mirror"
    options = FetchOptions(s3=s3_store_options(s3_store))
    result = ingest(uri, local_store, "flowers102", tmp_path / "cache", options)
    assert result.counts["train"] == 8
    record = json.loads(local_store.get_bytes("datasets/flowers102/raw/sources.json"))
    assert record["source"] == uri and record["verified"] is False


def s3_store_options(store: S3Store) -> S3Options:
    return S3Options(endpoint_url=store.endpoint, addressing_style="path")


# --------------------------------------------------------------------------------------------
# The download path, against a local HTTP server standing in for the official site.


@pytest.fixture
def http_source(synthetic_source: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serves a copy of the synthetic source folder over HTTP on 127.0.0.1."""
    import shutil

    root = Path(shutil.copytree(synthetic_source, tmp_path / "served"))
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_url_source(http_source: tuple[str, Path], local_store: LocalStore,
                    tmp_path: Path) -> None:
    url, _ = http_source
    result = run_ingest(url, local_store, tmp_path / "cache", retries=1, timeout=5)
    assert result.counts == {"train": 8, "valid": 8, "test": 8}


def test_html_page_served_instead_of_archive(http_source: tuple[str, Path],
                                             local_store: LocalStore, tmp_path: Path) -> None:
    url, root = http_source
    (root / flowers.ARCHIVE).write_bytes(b"<!DOCTYPE html><html>Rate limited</html>")
    with pytest.raises(ArchiveError, match="102flowers.tgz: is an HTML page"):
        run_ingest(url, local_store, tmp_path / "cache", retries=1, timeout=5)
    assert store_keys(local_store) == []
    downloads = list((tmp_path / "cache").rglob(flowers.ARCHIVE))
    assert downloads == []  # the bad download is not kept for the next run


def test_official_source_is_always_verified(http_source: tuple[str, Path],
                                            local_store: LocalStore, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = http_source
    monkeypatch.setattr(flowers, "BASE_URL", url)
    expected = flowers.SOURCE_MD5[flowers.ARCHIVE]
    with pytest.raises(SourceError, match=f"MD5 mismatch: expected {expected}"):
        run_ingest("official", local_store, tmp_path / "cache", retries=1, timeout=5)
    assert store_keys(local_store) == []


# --------------------------------------------------------------------------------------------
# Sources are parsed like stores (issue 9): one line naming the accepted forms, nothing written.

SOURCE_FORMS_TEXT = ("a source is 'official', a folder path, file://PATH, s3://bucket[/prefix], "
                     "an http(s)://host/path URL or imagefolder:PATH")


@pytest.mark.parametrize(("source", "message"), [
    ("ftp://example.org/flowers", "'ftp://example.org/flowers' uses an unsupported scheme "
                                  f"(ftp://); {SOURCE_FORMS_TEXT}"),
    ("", "--source must not be empty"),  # every empty text option: flowerml.cli.app
    ("   ", "--source must not be empty"),
    ("s3://", f"'s3://' has no bucket name; {SOURCE_FORMS_TEXT}"),
    ("s3://Bad_Bucket!/x", "'s3://Bad_Bucket!/x' has an invalid bucket name: S3 bucket names"),
    ("https://", f"'https://' has no host; {SOURCE_FORMS_TEXT}"),
    ("http://127.0.0.1:99999/flowers", "'http://127.0.0.1:99999/flowers' has an invalid port "
                                       "(ports are 1-65535)"),
    ("file://", "'file://' has no path after file://"),
])
def test_cli_refuses_a_source_that_is_no_accepted_form(source: str, message: str,
                                                       tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    result = invoke("ingest", "--source", source, store=store, cache=tmp_path / "cache")
    assert_refused(result, message)
    assert not store.root.exists()
    assert not (tmp_path / "cache").exists()


def test_cli_calls_a_source_file_a_file(synthetic_source: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    archive = synthetic_source / flowers.ARCHIVE
    result = invoke("ingest", "--source", str(archive), store=store, cache=tmp_path / "cache")
    assert_refused(result, f"source {archive} is a file, not a folder: a local source is the "
                           "folder holding 102flowers.tgz, imagelabels.mat and setid.mat")
    assert "folder " + str(archive) not in result.stderr
    assert not store.root.exists()


def test_cli_names_a_missing_source_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    result = invoke("ingest", "--source", str(tmp_path / "nowhere"), store=store,
                    cache=tmp_path / "cache")
    assert_refused(result, f"source folder {tmp_path / 'nowhere'} does not exist")
    assert not store.root.exists()


def test_file_uris_work_for_the_source_and_the_store(synthetic_source: Path,
                                                     tmp_path: Path) -> None:
    result = invoke("ingest", "--source", f"file://{synthetic_source}", "--store",
                    f"file://{tmp_path / 'store'}", "--json", cache=tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["counts"] == {
        "train": 8, "valid": 8, "test": 8}
    record = json.loads((tmp_path / "store/datasets/flowers102/raw/sources.json").read_text())
    assert record["source"] == str(synthetic_source)  # the folder the file:// URI names


def test_unknown_source_host_fails_at_once(local_store: LocalStore, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download, "_sleep", sleeps.append)
    with pytest.raises(SourceError, match="^http://no-such-host.invalid/flowers/102flowers.tgz: "
                                          "unknown host 'no-such-host.invalid'"):
        run_ingest("http://no-such-host.invalid/flowers", local_store, tmp_path / "cache",
                   retries=5)
    assert sleeps == []
    assert store_keys(local_store) == []


def test_refused_source_connection_is_retried_briefly_and_named(
        local_store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download, "_sleep", sleeps.append)
    url = f"http://127.0.0.1:{free_port()}/flowers"
    with pytest.raises(DownloadRetriesExhausted) as err:
        run_ingest(url, local_store, tmp_path / "cache", retries=5)
    assert str(err.value) == (f"{url}/{flowers.ARCHIVE}: download failed after 2 retries: "
                              "connection refused")
    assert sleeps == [1.0, 2.0]  # two brief retries, not five
    assert store_keys(local_store) == []


def test_a_missing_source_bucket_is_named(local_store: LocalStore, moto_endpoint: str,
                                          tmp_path: Path) -> None:
    result = invoke("ingest", "--source", "s3://no-such-source-bucket/flowers", "--json",
                    store=local_store, cache=tmp_path / "cache",
                    env={"FLOWERML_S3_ENDPOINT_URL": moto_endpoint})
    message = (f"source s3://no-such-source-bucket/flowers: bucket 'no-such-source-bucket' at "
               f"{moto_endpoint} does not exist")
    assert_refused(result, message)
    assert json.loads(result.stdout.splitlines()[-1])["error"] == message
    assert store_keys(local_store) == []
