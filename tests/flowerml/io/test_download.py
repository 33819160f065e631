"""flowerml.io.download against a real HTTP server on 127.0.0.1 with scripted behaviours
(tests/helpers/http_files.py): the transfer, its resume, its checks, its redirects; what it
retries is tests/flowerml/io/test_download_retries.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flowerml.core.errors import DownloadError, SourceError
from flowerml.io.download import download_file
from flowerml.io.urls import check_redirect, check_url
from tests.helpers.http_files import (
    FAST,
    HALF,
    PAYLOAD,
    PAYLOAD_MD5,
    Server,
    drop_after,
    raw_206,
    serve,
    status,
)
from tests.helpers.network import free_port

# --- 1. plain download, checksum, skip -----------------------------------------------------


def test_plain_download_verifies_md5_and_second_call_skips(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "sub" / "file.bin"
    seen: list[tuple[int, int | None]] = []

    result = download_file(
        http_server.url(),
        dest,
        expected_md5=PAYLOAD_MD5,
        progress=lambda n, t: seen.append((n, t)),
        **FAST,
    )

    assert result == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "file.bin.part").exists()
    assert script.ranges == [None]
    assert script.requests[0].headers.get("Accept-Encoding") == "identity"
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)

    assert download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST) == dest
    assert download_file(http_server.url(), dest, **FAST) == dest
    assert len(script.requests) == 1


def test_existing_dest_with_wrong_md5_is_downloaded_again(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 1


# --- 2. resume after a dropped connection --------------------------------------------------


def test_dropped_connection_resumes_with_range(http_server: Server, tmp_path: Path, download_sleeps):
    script = http_server.serve(drop_after(HALF), serve())
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-"]
    assert download_sleeps == [0.01]


def test_part_left_by_an_earlier_call_is_resumed(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:1000])

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == ["bytes=1000-"]


def test_416_for_a_complete_part_finishes_without_body(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_416_for_a_part_of_the_wrong_size_restarts(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD + b"junk")

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_206_at_the_wrong_offset_is_discarded(http_server: Server, tmp_path: Path):
    script = http_server.serve(
        drop_after(HALF),
        raw_206(f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD)}", PAYLOAD),
        serve(),
    )
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", None]


def test_more_bytes_than_content_range_total_restarts(http_server: Server, tmp_path: Path):
    script = http_server.serve(
        drop_after(HALF),
        raw_206(f"bytes {HALF}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}", PAYLOAD[HALF:] + b"extra"),
        serve(),
    )
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", None]


# --- 4. a server that ignores Range --------------------------------------------------------


def test_server_ignoring_range_restarts_the_file_cleanly(http_server: Server, tmp_path: Path):
    script = http_server.serve(drop_after(HALF), serve(honour_range=False))
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD  # not the first half followed by the whole file
    assert script.ranges == [None, f"bytes={HALF}-"]


# --- 5. wrong length, wrong checksum -------------------------------------------------------


def test_content_length_larger_than_body_fails_after_retries(http_server: Server, tmp_path: Path):
    script = http_server.serve(drop_after(len(PAYLOAD), claimed=len(PAYLOAD) + 10))
    dest = tmp_path / "file.bin"

    with pytest.raises(DownloadError) as err:
        download_file(http_server.url(), dest, retries=2, **FAST)

    assert len(script.requests) == 3
    assert script.ranges == [None, f"bytes={len(PAYLOAD)}-", f"bytes={len(PAYLOAD)}-"]
    message = str(err.value)
    assert http_server.url() in message
    assert "after 2 retries" in message
    assert "the server closed the connection mid-response" in message  # the cause in words
    assert not dest.exists()


def test_wrong_checksum_is_a_source_error_and_leaves_nothing(http_server: Server, tmp_path: Path):
    script = http_server.serve(serve())
    dest = tmp_path / "file.bin"
    wrong = "0" * 32

    with pytest.raises(SourceError, match="MD5 mismatch") as err:
        download_file(http_server.url(), dest, expected_md5=wrong, **FAST)

    message = str(err.value)
    assert message.startswith("file.bin: MD5 mismatch")
    assert wrong in message and PAYLOAD_MD5 in message and http_server.url() in message
    assert len(script.requests) == 1
    assert not dest.exists()
    assert not (tmp_path / "file.bin.part").exists()
    assert list(tmp_path.iterdir()) == []


# --- 8. schemes and redirects --------------------------------------------------------------


def test_http_redirect_is_followed(http_server: Server, tmp_path: Path):
    script = http_server.serve(status(302, Location="/real.bin"), serve())
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert [r.path for r in script.requests] == ["/file.bin", "/real.bin"]


def test_resume_range_survives_a_redirect(http_server: Server, tmp_path: Path):
    script = http_server.serve(drop_after(HALF), status(307, Location="/real.bin"), serve())
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", f"bytes={HALF}-"]


def test_redirect_to_another_scheme_is_refused_before_requesting(http_server: Server, tmp_path: Path):
    script = http_server.serve(status(302, Location="ftp://example.org/file.bin"))

    with pytest.raises(SourceError, match="refusing redirect"):
        download_file(http_server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "url", ["ftp://example.org/x.tgz", "file:///tmp/x.tgz", "example.org/x.tgz", ""]
)
def test_non_http_schemes_are_refused(url: str, tmp_path: Path, download_sleeps):
    with pytest.raises(SourceError, match="only http and https"):
        download_file(url, tmp_path / "x.tgz", **FAST)
    with pytest.raises(SourceError):
        check_url(url)
    assert download_sleeps == []
    assert list(tmp_path.iterdir()) == []


# --- 9. credentials never named ------------------------------------------------------------


def _with_userinfo(url: str) -> str:
    return url.replace("://", "://alice:s3cr3t@", 1)


def _assert_clean(message: str) -> None:
    assert "s3cr3t" not in message
    assert "alice" not in message


def test_userinfo_is_not_in_a_404_message(http_server: Server, tmp_path: Path):
    script = http_server.serve(status(404))

    with pytest.raises(SourceError) as err:
        download_file(_with_userinfo(http_server.url()), tmp_path / "f", **FAST)

    _assert_clean(str(err.value))
    assert http_server.url() in str(err.value)
    assert script.requests[0].headers.get("Authorization", "").startswith("Basic ")


def test_userinfo_is_not_in_retry_or_checksum_messages(http_server: Server, tmp_path: Path, caplog):
    url = _with_userinfo(f"http://127.0.0.1:{free_port()}/f")
    with (caplog.at_level(logging.WARNING, logger="flowerml.io.download"),
          pytest.raises(DownloadError) as err):
        download_file(url, tmp_path / "f", retries=1, **FAST)
    _assert_clean(str(err.value))
    assert len(caplog.records) == 1  # the retry announcement, without the credentials
    _assert_clean(caplog.records[0].getMessage())

    http_server.serve(serve())
    with pytest.raises(SourceError) as err2:
        download_file(_with_userinfo(http_server.url()), tmp_path / "f", expected_md5="0" * 32, **FAST)
    _assert_clean(str(err2.value))

    with pytest.raises(SourceError) as err3:
        download_file("ftp://alice:s3cr3t@example.org/f", tmp_path / "f", **FAST)
    _assert_clean(str(err3.value))

    with pytest.raises(SourceError) as err4:
        check_redirect("https://alice:s3cr3t@a.example/f", "http://alice:s3cr3t@a.example/f")
    _assert_clean(str(err4.value))
