"""flowerml.io.download_retries through flowerml.io.download, against a real HTTP server on 127.0.0.1
with scripted behaviours (tests/helpers/http_files.py): which failures are retried, how often,
after how long, how each retry is announced, and which fail at once."""

from __future__ import annotations

import logging
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from flowerml.core.errors import (
    DownloadError,
    DownloadRetriesExhausted,
    RetriesExhausted,
    SourceError,
)
from flowerml.io.download import download_file
from tests.helpers.http_files import (
    FAST,
    PAYLOAD,
    PAYLOAD_MD5,
    Script,
    ScriptedHandler,
    Server,
    serve,
    status,
)
from tests.helpers.network import free_port

# --- 3. retryable statuses -----------------------------------------------------------------


def test_503_then_200_is_retried(http_server: Server, tmp_path: Path, download_sleeps):
    script = http_server.serve(status(503), serve())
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert download_sleeps == [0.01]


def test_429_with_retry_after_zero_is_retried_at_once(http_server: Server, tmp_path: Path, download_sleeps):
    script = http_server.serve(status(429, Retry_After="0"), serve())
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert download_sleeps == [0.0]


def test_backoff_doubles_and_is_capped_retry_after_too(http_server: Server, tmp_path: Path, download_sleeps):
    script = http_server.serve(
        status(500), status(502), status(504), status(503, Retry_After="3600"), serve()
    )
    dest = tmp_path / "file.bin"

    download_file(http_server.url(), dest, retries=4, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 5
    # 0.01 * 2**attempt, capped at max_backoff=0.05; Retry-After is capped as well.
    assert download_sleeps == pytest.approx([0.01, 0.02, 0.04, 0.05])


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_always_503_is_requested_exactly_retries_plus_one_times(
        http_server: Server, tmp_path: Path, download_sleeps, retries: int):
    script = http_server.serve(status(503, Retry_After="0.02"))
    dest = tmp_path / "file.bin"

    with pytest.raises(DownloadRetriesExhausted) as err:
        download_file(http_server.url(), dest, retries=retries, **FAST)

    # The library owns the retry policy of an HTTP download: retries+1 requests, no more, and
    # its failure says so to outer layers (RetriesExhausted: Prefect does not retry it again).
    assert len(script.requests) == retries + 1
    assert isinstance(err.value, RetriesExhausted) and isinstance(err.value, DownloadError)
    assert f"after {retries} retries: HTTP 503 Service Unavailable" in str(err.value)
    assert download_sleeps == pytest.approx([0.02] * retries)  # the server's Retry-After, not backoff
    assert not dest.exists()


# --- 6. permanent HTTP errors --------------------------------------------------------------


def test_404_is_a_source_error_without_retry(http_server: Server, tmp_path: Path, download_sleeps):
    script = http_server.serve(status(404))
    url = http_server.url("/x.tgz")

    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "x.tgz", **FAST)

    assert str(err.value) == f"{url}: HTTP 404 Not Found"
    assert len(script.requests) == 1
    assert download_sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_403_is_a_source_error_without_retry(http_server: Server, tmp_path: Path):
    script = http_server.serve(status(403))

    with pytest.raises(SourceError, match="HTTP 403 Forbidden"):
        download_file(http_server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1


def test_unlisted_5xx_is_transient_but_not_retried_here(http_server: Server, tmp_path: Path):
    script = http_server.serve(status(501))

    with pytest.raises(DownloadError, match="HTTP 501") as err:
        download_file(http_server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1
    # Not retried here, so not marked as retried: the task layer may still retry it.
    assert not isinstance(err.value, RetriesExhausted)


# --- 7. unreachable endpoint ---------------------------------------------------------------


def test_refused_connection_is_retried_briefly_then_named(tmp_path: Path, download_sleeps, caplog):
    # Nothing listens there: a wrong port or a stopped server. Two quick retries (a restart),
    # not `retries` of them, each announced as it happens.
    url = f"http://127.0.0.1:{free_port()}/file.bin"

    with (caplog.at_level(logging.WARNING, logger="flowerml.io.download"),
          pytest.raises(DownloadRetriesExhausted) as err):
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)

    assert download_sleeps == pytest.approx([0.01, 0.02])  # REFUSED_RETRIES, not 5
    assert str(err.value) == f"{url}: download failed after 2 retries: connection refused"
    assert [r.getMessage() for r in caplog.records] == [
        f"download of {url} failed (connection refused); retry 1 of 2 in 0.0 s",
        f"download of {url} failed (connection refused); retry 2 of 2 in 0.0 s",
    ]
    assert not (tmp_path / "file.bin").exists()


def test_refused_connection_obeys_fewer_retries(tmp_path: Path, download_sleeps):
    url = f"http://127.0.0.1:{free_port()}/file.bin"
    with pytest.raises(DownloadRetriesExhausted, match="after 0 retries: connection refused"):
        download_file(url, tmp_path / "file.bin", retries=0, **FAST)
    assert download_sleeps == []


def test_unknown_host_fails_at_once(tmp_path: Path, download_sleeps, caplog):
    # .invalid never resolves (RFC 6761): nothing to wait for.
    url = "http://no-such-host.invalid/file.bin"

    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)

    assert str(err.value) == (f"{url}: unknown host 'no-such-host.invalid' "
                              "(no such name in DNS)")
    assert not isinstance(err.value, DownloadError)  # bad input: no layer retries it
    assert download_sleeps == [] and caplog.records == []
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:99999/file.bin", "has an invalid port (ports are 1-65535)"),
    ("http://127.0.0.1:0/file.bin", "has an invalid port (ports are 1-65535)"),
    ("http://127.0.0.1:http/file.bin", "has an invalid port (ports are 1-65535)"),
    ("https:///file.bin", "has no host"),
    ("https://", "has no host"),
])
def test_a_url_that_cannot_work_is_refused_before_any_request(url: str, problem: str,
                                                              tmp_path: Path, download_sleeps):
    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)
    assert str(err.value).endswith(f": {problem}")
    assert download_sleeps == []
    assert not list(tmp_path.iterdir())


def test_retries_are_announced_with_the_url_and_the_cause(http_server: Server, tmp_path: Path,
                                                          caplog):
    http_server.serve(status(503), serve())

    with caplog.at_level(logging.WARNING, logger="flowerml.io.download"):
        download_file(http_server.url(), tmp_path / "file.bin", retries=3, **FAST)

    assert [r.getMessage() for r in caplog.records] == [
        f"download of {http_server.url()} failed (HTTP 503 Service Unavailable); "
        "retry 1 of 3 in 0.0 s"]
    assert caplog.records[0].levelno == logging.WARNING


def _self_signed_https(tmp_path: Path) -> tuple[ThreadingHTTPServer, int]:
    """An HTTPS server on 127.0.0.1 whose certificate no CA vouches for."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.script = Script([serve()])  # type: ignore[attr-defined]
    return httpd, httpd.server_address[1]


def test_a_certificate_that_does_not_verify_fails_at_once(tmp_path: Path, download_sleeps):
    httpd, port = _self_signed_https(tmp_path)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        with pytest.raises(SourceError) as err:
            download_file(f"https://127.0.0.1:{port}/f", tmp_path / "f", retries=5, **FAST)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert str(err.value).startswith(f"https://127.0.0.1:{port}/f: TLS certificate of "
                                     "'127.0.0.1' does not verify (")
    assert download_sleeps == []
    assert not (tmp_path / "f").exists()
