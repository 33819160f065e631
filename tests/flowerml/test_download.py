"""flowerml.download against a real HTTP server on 127.0.0.1 with scripted behaviours."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flowerml import download
from flowerml.download import (
    check_redirect,
    check_url,
    download_file,
    md5_of,
    redact_url,
    sha256_of,
)
from flowerml.errors import DownloadError, DownloadRetriesExhausted, RetriesExhausted, SourceError
from tests.helpers.network import free_port

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes: several chunks at chunk_size=4096
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2
FAST = {"backoff": 0.01, "max_backoff": 0.05, "chunk_size": 4096, "timeout": 5.0}

Behaviour = Callable[[BaseHTTPRequestHandler], None]


# --- scripted server -----------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    range: str | None
    headers: dict[str, str]


@dataclass
class Script:
    """Behaviours served in order; the last one repeats once the script runs out."""

    behaviours: list[Behaviour] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, seen: Seen) -> Behaviour:
        with self.lock:
            self.requests.append(seen)
            if len(self.behaviours) > 1:
                return self.behaviours.pop(0)
            return self.behaviours[0]

    @property
    def ranges(self) -> list[str | None]:
        return [r.range for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a behaviour can end a body early by returning.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        seen = Seen(self.path, self.headers.get("Range"), dict(self.headers.items()))
        self.server.script.next(seen)(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@dataclass
class Server:
    script: Script
    port: int

    def url(self, path: str = "/file.bin") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, *behaviours: Behaviour) -> Script:
        self.script.behaviours[:] = behaviours
        return self.script


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    script = Script()
    httpd.script = script  # type: ignore[attr-defined]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield Server(script, httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every backoff delay (and still sleep it: they are tiny with FAST)."""
    delays: list[float] = []
    real = download._sleep

    def record(seconds: float) -> None:
        delays.append(seconds)
        real(seconds)

    monkeypatch.setattr(download, "_sleep", record)
    return delays


def _range_start(handler: BaseHTTPRequestHandler) -> int | None:
    value = handler.headers.get("Range")
    if not value:
        return None
    assert value.startswith("bytes=") and value.endswith("-"), value
    return int(value[len("bytes=") : -1])


def serve(payload: bytes = PAYLOAD, *, honour_range: bool = True) -> Behaviour:
    """A well-behaved file server (200, or 206/416 for a Range)."""

    def behave(h: BaseHTTPRequestHandler) -> None:
        start = _range_start(h) if honour_range else None
        if start is None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        elif start >= len(payload):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(payload)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            h.send_header("Content-Length", str(len(payload) - start))
            h.end_headers()
            h.wfile.write(payload[start:])

    return behave


def drop_after(n: int, payload: bytes = PAYLOAD, *, claimed: int | None = None) -> Behaviour:
    """200 announcing the whole length (or ``claimed``), then close after ``n`` bytes."""

    def behave(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(claimed if claimed is not None else len(payload)))
        h.end_headers()
        h.wfile.write(payload[:n])
        h.wfile.flush()
        h.close_connection = True

    return behave


def status(code: int, **headers: str) -> Behaviour:
    def behave(h: BaseHTTPRequestHandler) -> None:
        body = f"status {code}\n".encode()
        h.send_response(code)
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return behave


def raw_206(content_range: str, body: bytes) -> Behaviour:
    """206 with a given Content-Range and a close-delimited body (no Content-Length)."""

    def behave(h: BaseHTTPRequestHandler) -> None:
        h.send_response(206)
        h.send_header("Content-Range", content_range)
        h.end_headers()
        h.wfile.write(body)

    return behave


# --- 1. plain download, checksum, skip -----------------------------------------------------


def test_plain_download_verifies_md5_and_second_call_skips(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "sub" / "file.bin"
    seen: list[tuple[int, int | None]] = []

    result = download_file(
        server.url(),
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

    assert download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST) == dest
    assert download_file(server.url(), dest, **FAST) == dest
    assert len(script.requests) == 1


def test_existing_dest_with_wrong_md5_is_downloaded_again(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 1


# --- 2. resume after a dropped connection --------------------------------------------------


def test_dropped_connection_resumes_with_range(server: Server, tmp_path: Path, sleeps):
    script = server.serve(drop_after(HALF), serve())
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-"]
    assert sleeps == [0.01]


def test_part_left_by_an_earlier_call_is_resumed(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:1000])

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == ["bytes=1000-"]


def test_416_for_a_complete_part_finishes_without_body(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_416_for_a_part_of_the_wrong_size_restarts(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD + b"junk")

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_206_at_the_wrong_offset_is_discarded(server: Server, tmp_path: Path):
    script = server.serve(
        drop_after(HALF),
        raw_206(f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD)}", PAYLOAD),
        serve(),
    )
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", None]


def test_more_bytes_than_content_range_total_restarts(server: Server, tmp_path: Path):
    script = server.serve(
        drop_after(HALF),
        raw_206(f"bytes {HALF}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}", PAYLOAD[HALF:] + b"extra"),
        serve(),
    )
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", None]


# --- 3. retryable statuses -----------------------------------------------------------------


def test_503_then_200_is_retried(server: Server, tmp_path: Path, sleeps):
    script = server.serve(status(503), serve())
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert sleeps == [0.01]


def test_429_with_retry_after_zero_is_retried_at_once(server: Server, tmp_path: Path, sleeps):
    script = server.serve(status(429, Retry_After="0"), serve())
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert sleeps == [0.0]


def test_backoff_doubles_and_is_capped_retry_after_too(server: Server, tmp_path: Path, sleeps):
    script = server.serve(
        status(500), status(502), status(504), status(503, Retry_After="3600"), serve()
    )
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, retries=4, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 5
    # 0.01 * 2**attempt, capped at max_backoff=0.05; Retry-After is capped as well.
    assert sleeps == pytest.approx([0.01, 0.02, 0.04, 0.05])


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_always_503_is_requested_exactly_retries_plus_one_times(
        server: Server, tmp_path: Path, sleeps, retries: int):
    script = server.serve(status(503, Retry_After="0.02"))
    dest = tmp_path / "file.bin"

    with pytest.raises(DownloadRetriesExhausted) as err:
        download_file(server.url(), dest, retries=retries, **FAST)

    # The library owns the retry policy of an HTTP download: retries+1 requests, no more, and
    # its failure says so to outer layers (RetriesExhausted: Prefect does not retry it again).
    assert len(script.requests) == retries + 1
    assert isinstance(err.value, RetriesExhausted) and isinstance(err.value, DownloadError)
    assert f"after {retries} retries: HTTP 503 Service Unavailable" in str(err.value)
    assert sleeps == pytest.approx([0.02] * retries)  # the server's Retry-After, not backoff
    assert not dest.exists()


# --- 4. a server that ignores Range --------------------------------------------------------


def test_server_ignoring_range_restarts_the_file_cleanly(server: Server, tmp_path: Path):
    script = server.serve(drop_after(HALF), serve(honour_range=False))
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD  # not the first half followed by the whole file
    assert script.ranges == [None, f"bytes={HALF}-"]


# --- 5. wrong length, wrong checksum -------------------------------------------------------


def test_content_length_larger_than_body_fails_after_retries(server: Server, tmp_path: Path):
    script = server.serve(drop_after(len(PAYLOAD), claimed=len(PAYLOAD) + 10))
    dest = tmp_path / "file.bin"

    with pytest.raises(DownloadError) as err:
        download_file(server.url(), dest, retries=2, **FAST)

    assert len(script.requests) == 3
    assert script.ranges == [None, f"bytes={len(PAYLOAD)}-", f"bytes={len(PAYLOAD)}-"]
    message = str(err.value)
    assert server.url() in message
    assert "after 2 retries" in message
    assert "the server closed the connection mid-response" in message  # the cause in words
    assert not dest.exists()


def test_wrong_checksum_is_a_source_error_and_leaves_nothing(server: Server, tmp_path: Path):
    script = server.serve(serve())
    dest = tmp_path / "file.bin"
    wrong = "0" * 32

    with pytest.raises(SourceError, match="MD5 mismatch") as err:
        download_file(server.url(), dest, expected_md5=wrong, **FAST)

    message = str(err.value)
    assert message.startswith("file.bin: MD5 mismatch")
    assert wrong in message and PAYLOAD_MD5 in message and server.url() in message
    assert len(script.requests) == 1
    assert not dest.exists()
    assert not (tmp_path / "file.bin.part").exists()
    assert list(tmp_path.iterdir()) == []


# --- 6. permanent HTTP errors --------------------------------------------------------------


def test_404_is_a_source_error_without_retry(server: Server, tmp_path: Path, sleeps):
    script = server.serve(status(404))
    url = server.url("/x.tgz")

    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "x.tgz", **FAST)

    assert str(err.value) == f"{url}: HTTP 404 Not Found"
    assert len(script.requests) == 1
    assert sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_403_is_a_source_error_without_retry(server: Server, tmp_path: Path):
    script = server.serve(status(403))

    with pytest.raises(SourceError, match="HTTP 403 Forbidden"):
        download_file(server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1


def test_unlisted_5xx_is_transient_but_not_retried_here(server: Server, tmp_path: Path):
    script = server.serve(status(501))

    with pytest.raises(DownloadError, match="HTTP 501") as err:
        download_file(server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1
    # Not retried here, so not marked as retried: the task layer may still retry it.
    assert not isinstance(err.value, RetriesExhausted)


# --- 7. unreachable endpoint ---------------------------------------------------------------


def test_refused_connection_is_retried_briefly_then_named(tmp_path: Path, sleeps, caplog):
    # Nothing listens there: a wrong port or a stopped server. Two quick retries (a restart),
    # not `retries` of them, each announced as it happens.
    url = f"http://127.0.0.1:{free_port()}/file.bin"

    with (caplog.at_level(logging.WARNING, logger="flowerml.download"),
          pytest.raises(DownloadRetriesExhausted) as err):
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)

    assert sleeps == pytest.approx([0.01, 0.02])  # REFUSED_RETRIES, not 5
    assert str(err.value) == f"{url}: download failed after 2 retries: connection refused"
    assert [r.getMessage() for r in caplog.records] == [
        f"download of {url} failed (connection refused); retry 1 of 2 in 0.0 s",
        f"download of {url} failed (connection refused); retry 2 of 2 in 0.0 s",
    ]
    assert not (tmp_path / "file.bin").exists()


def test_refused_connection_obeys_fewer_retries(tmp_path: Path, sleeps):
    url = f"http://127.0.0.1:{free_port()}/file.bin"
    with pytest.raises(DownloadRetriesExhausted, match="after 0 retries: connection refused"):
        download_file(url, tmp_path / "file.bin", retries=0, **FAST)
    assert sleeps == []


def test_unknown_host_fails_at_once(tmp_path: Path, sleeps, caplog):
    # .invalid never resolves (RFC 6761): nothing to wait for.
    url = "http://no-such-host.invalid/file.bin"

    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)

    assert str(err.value) == (f"{url}: unknown host 'no-such-host.invalid' "
                              "(no such name in DNS)")
    assert not isinstance(err.value, DownloadError)  # bad input: no layer retries it
    assert sleeps == [] and caplog.records == []
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:99999/file.bin", "has an invalid port (ports are 1-65535)"),
    ("http://127.0.0.1:0/file.bin", "has an invalid port (ports are 1-65535)"),
    ("http://127.0.0.1:http/file.bin", "has an invalid port (ports are 1-65535)"),
    ("https:///file.bin", "has no host"),
    ("https://", "has no host"),
])
def test_a_url_that_cannot_work_is_refused_before_any_request(url: str, problem: str,
                                                              tmp_path: Path, sleeps):
    with pytest.raises(SourceError) as err:
        download_file(url, tmp_path / "file.bin", retries=5, **FAST)
    assert str(err.value).endswith(f": {problem}")
    assert sleeps == []
    assert not list(tmp_path.iterdir())


def test_retries_are_announced_with_the_url_and_the_cause(server: Server, tmp_path: Path,
                                                          caplog):
    server.serve(status(503), serve())

    with caplog.at_level(logging.WARNING, logger="flowerml.download"):
        download_file(server.url(), tmp_path / "file.bin", retries=3, **FAST)

    assert [r.getMessage() for r in caplog.records] == [
        f"download of {server.url()} failed (HTTP 503 Service Unavailable); "
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
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.script = Script([serve()])  # type: ignore[attr-defined]
    return httpd, httpd.server_address[1]


def test_a_certificate_that_does_not_verify_fails_at_once(tmp_path: Path, sleeps):
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
    assert sleeps == []
    assert not (tmp_path / "f").exists()


# --- 8. schemes and redirects --------------------------------------------------------------


def test_http_redirect_is_followed(server: Server, tmp_path: Path):
    script = server.serve(status(302, Location="/real.bin"), serve())
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert [r.path for r in script.requests] == ["/file.bin", "/real.bin"]


def test_resume_range_survives_a_redirect(server: Server, tmp_path: Path):
    script = server.serve(drop_after(HALF), status(307, Location="/real.bin"), serve())
    dest = tmp_path / "file.bin"

    download_file(server.url(), dest, expected_md5=PAYLOAD_MD5, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert script.ranges == [None, f"bytes={HALF}-", f"bytes={HALF}-"]


def test_redirect_to_another_scheme_is_refused_before_requesting(server: Server, tmp_path: Path):
    script = server.serve(status(302, Location="ftp://example.org/file.bin"))

    with pytest.raises(SourceError, match="refusing redirect"):
        download_file(server.url(), tmp_path / "file.bin", **FAST)

    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("https://a.example/f", "http://a.example/f"),
        ("https://a.example/f", "http://b.example/f"),
        ("HTTPS://a.example/f", "HTTP://a.example/f"),
        ("https://a.example/f", "ftp://a.example/f"),
        ("http://a.example/f", "file:///etc/passwd"),
    ],
)
def test_check_redirect_refuses_downgrades_and_other_schemes(src: str, dst: str):
    with pytest.raises(SourceError, match="refusing redirect"):
        check_redirect(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("https://a.example/f", "https://b.example/g"),
        ("http://a.example/f", "https://a.example/f"),
        ("http://a.example/f", "http://b.example/f"),
    ],
)
def test_check_redirect_allows_safe_hops(src: str, dst: str):
    check_redirect(src, dst)


@pytest.mark.parametrize(
    "url", ["ftp://example.org/x.tgz", "file:///tmp/x.tgz", "example.org/x.tgz", ""]
)
def test_non_http_schemes_are_refused(url: str, tmp_path: Path, sleeps):
    with pytest.raises(SourceError, match="only http and https"):
        download_file(url, tmp_path / "x.tgz", **FAST)
    with pytest.raises(SourceError):
        check_url(url)
    assert sleeps == []
    assert list(tmp_path.iterdir()) == []


# --- 9. credentials never named ------------------------------------------------------------


def _with_userinfo(url: str) -> str:
    return url.replace("://", "://alice:s3cr3t@", 1)


def _assert_clean(message: str) -> None:
    assert "s3cr3t" not in message
    assert "alice" not in message


def test_userinfo_is_not_in_a_404_message(server: Server, tmp_path: Path):
    script = server.serve(status(404))

    with pytest.raises(SourceError) as err:
        download_file(_with_userinfo(server.url()), tmp_path / "f", **FAST)

    _assert_clean(str(err.value))
    assert server.url() in str(err.value)
    assert script.requests[0].headers.get("Authorization", "").startswith("Basic ")


def test_userinfo_is_not_in_retry_or_checksum_messages(server: Server, tmp_path: Path, caplog):
    url = _with_userinfo(f"http://127.0.0.1:{free_port()}/f")
    with (caplog.at_level(logging.WARNING, logger="flowerml.download"),
          pytest.raises(DownloadError) as err):
        download_file(url, tmp_path / "f", retries=1, **FAST)
    _assert_clean(str(err.value))
    assert len(caplog.records) == 1  # the retry announcement, without the credentials
    _assert_clean(caplog.records[0].getMessage())

    server.serve(serve())
    with pytest.raises(SourceError) as err2:
        download_file(_with_userinfo(server.url()), tmp_path / "f", expected_md5="0" * 32, **FAST)
    _assert_clean(str(err2.value))

    with pytest.raises(SourceError) as err3:
        download_file("ftp://alice:s3cr3t@example.org/f", tmp_path / "f", **FAST)
    _assert_clean(str(err3.value))

    with pytest.raises(SourceError) as err4:
        check_redirect("https://alice:s3cr3t@a.example/f", "http://alice:s3cr3t@a.example/f")
    _assert_clean(str(err4.value))


def test_redact_url_strips_userinfo_and_query():
    assert redact_url("https://u:p@host:8443/a/b.tgz?X-Amz-Signature=abc#frag") == (
        "https://host:8443/a/b.tgz?<redacted>"
    )
    assert redact_url("https://host/x.tgz") == "https://host/x.tgz"


# --- helpers -------------------------------------------------------------------------------


def test_checksum_helpers_stream_files(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD * 30)  # > 1 MiB: more than one read
    assert md5_of(path) == hashlib.md5(PAYLOAD * 30).hexdigest()
    assert sha256_of(path) == hashlib.sha256(PAYLOAD * 30).hexdigest()
