"""Fetching one file over HTTP(S) into a local path, safely.

This module owns the transfer itself: streaming to ``<dest>.part``, resuming with ``Range``,
retrying transient failures with capped exponential backoff, refusing redirects that downgrade
https to http, verifying the MD5 and only then moving the file into place with ``os.replace``.
It also owns the streaming checksum helpers (`md5_of`, `sha256_of`) and `redact_url`, which
strips credentials from a URL before it is named in an error.

Bad input (a 404, a non-http scheme, a URL without a host or with a port outside 1-65535, an
unknown host, a TLS certificate that does not verify, a wrong checksum) raises `SourceError` at
once; a failure that may pass later (5xx, throttling, a flaky connection, a timeout) raises
`DownloadRetriesExhausted` once the retries are spent.

Retry policy: this loop is the only layer that retries an HTTP download. It retries 429, 500,
502, 503, 504 and transport failures (timeouts, resets, dropped connections, a DNS server that
did not answer) up to ``retries`` times, except a refused connection: the host answered and
nothing listens on that port (a wrong port, a stopped server), so it is retried at most
`REFUSED_RETRIES` times, in case the server is restarting. Each retry is announced as it
happens by a warning on the ``flowerml.download`` logger, naming the URL (redacted), the cause
in words and the delay; the final error names them too. Its failure after the retries is a
`RetriesExhausted`, which the Prefect fetch task does not retry again (else the attempts
multiply: retries+1 requests per task run, times the task's runs). A transient failure this
loop does not retry (an unlisted 5xx such as 501) is a plain `DownloadError`, which the task
layer may retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from flowerml.errors import DownloadError, DownloadRetriesExhausted, SourceError

__all__ = [
    "RETRY_STATUSES",
    "check_redirect",
    "check_url",
    "download_file",
    "md5_of",
    "redact_url",
    "sha256_of",
    "url_problem",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]

# Statuses that say "try again later" rather than "this URL is wrong".
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
ALLOWED_SCHEMES = frozenset({"http", "https"})
MAX_REDIRECTS = 20
REFUSED_RETRIES = 2
"""Retries for a refused connection (about 3 s at the default backoff), whatever ``retries``."""

# Transport failures worth a look: `_transport_failure` says which of them may heal.
# LocalProtocolError and UnsupportedProtocol are left out on purpose: they are our own mistakes
# and would fail the same way every time.
_RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)

# Indirection so tests can observe the backoff delays without sleeping.
_sleep = time.sleep


# --- checksums -----------------------------------------------------------------------------


def _digest_of(path: Path, algorithm: str) -> str:
    # file_digest reads in chunks: the archive is ~330 MB and must not be held in memory.
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def md5_of(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in chunks (the published Flowers-102 checksums are MD5)."""
    return _digest_of(Path(path), "md5")


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _digest_of(Path(path), "sha256")


# --- URLs ----------------------------------------------------------------------------------


def redact_url(url: str | httpx.URL) -> str:
    """The URL as it may appear in a message: no ``user:pass@``, no query string.

    The query is dropped too because presigned URLs carry their signature there.
    """
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _scheme(url: str | httpx.URL) -> str:
    try:
        return urlsplit(str(url)).scheme.lower()
    except ValueError:
        return ""


def url_problem(url: str | httpx.URL) -> str | None:
    """Why ``url`` cannot be requested, or None: not http(s), no host, a port outside 1-65535.

    Such a URL fails the same way every time: retrying it would only delay the error.
    """
    if _scheme(url) not in ALLOWED_SCHEMES:
        return "is not an http(s) URL"
    try:
        parts = urlsplit(str(url))
        port = parts.port  # raises for 99999 or a non-number
    except ValueError:
        return "has an invalid port (ports are 1-65535)"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has an invalid port (ports are 1-65535)"
    return None


def check_url(url: str | httpx.URL) -> None:
    """Raise `SourceError` unless ``url`` is an absolute http or https URL that names a host
    (and a port in 1-65535, if any)."""
    problem = url_problem(url)
    if problem == "is not an http(s) URL":
        raise SourceError(f"{redact_url(url)}: only http and https URLs can be downloaded")
    if problem:
        raise SourceError(f"{redact_url(url)}: {problem}")


def check_redirect(from_url: str | httpx.URL, to_url: str | httpx.URL) -> None:
    """Raise `SourceError` if following ``from_url -> to_url`` is unsafe.

    Unsafe means a scheme other than http(s), or https downgraded to http (which would expose
    the transfer, and any credentials, to anyone on the path).
    """
    if _scheme(to_url) not in ALLOWED_SCHEMES:
        raise SourceError(
            f"{redact_url(from_url)}: refusing redirect to non-http(s) URL {redact_url(to_url)}"
        )
    if _scheme(from_url) == "https" and _scheme(to_url) == "http":
        raise SourceError(
            f"{redact_url(from_url)}: refusing redirect that downgrades https to http "
            f"({redact_url(to_url)})"
        )


# --- one attempt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Retry:
    """An attempt that failed in a way worth retrying."""

    reason: str
    retry_after: float | None = None
    max_retries: int | None = None
    """A lower cap than ``retries`` for this kind of failure (a refused connection)."""


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 99, 100); ``bytes */100`` -> (None, None, 100).

    Unknown parts are None; a malformed header gives (None, None, None).
    """
    if not value:
        return None, None, None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None, None
    span, _, total_text = rest.strip().partition("/")
    total = int(total_text) if total_text.strip().isdigit() else None
    start_text, dash, end_text = span.strip().partition("-")
    if dash and start_text.isdigit() and end_text.isdigit():
        return int(start_text), int(end_text), total
    return None, None, total


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _retry_after(response: httpx.Response) -> float | None:
    # Only the numeric form: an HTTP-date would need the server's clock to agree with ours.
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _status_text(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _open(client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
    """Send GET and follow redirects by hand, vetting each hop before it is requested."""
    request = client.build_request("GET", url, headers=headers)
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(request, stream=True, follow_redirects=False)
        if response.next_request is None:
            return response
        response.close()
        # Checked before the next request goes out, so a downgrade never hits the wire.
        check_redirect(request.url, response.next_request.url)
        request = response.next_request
    raise SourceError(f"{redact_url(url)}: more than {MAX_REDIRECTS} redirects")


def _attempt(
    client: httpx.Client,
    url: str,
    part: Path,
    progress: Progress | None,
    chunk_size: int,
) -> _Retry | None:
    """Try once to bring ``part`` to the complete file. None means it is complete."""
    offset = _part_size(part)
    # identity: ranges and Content-Length must count the bytes of the file itself, and a
    # server that gzips a .tgz "for transport" must not get it decoded into a .tar.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"

    response = _open(client, url, headers)
    try:
        return _handle(response, url, part, offset, progress, chunk_size)
    finally:
        # Also on an early return or a dropped connection: frees the pooled connection.
        response.close()


def _handle(
    response: httpx.Response,
    url: str,
    part: Path,
    offset: int,
    progress: Progress | None,
    chunk_size: int,
) -> _Retry | None:
    """Act on one (non-redirect) response to a request for ``part`` from ``offset``."""
    status = response.status_code

    if status == 416 and offset:
        _, _, total = _parse_content_range(response.headers.get("Content-Range"))
        if total == offset:
            # The part already holds every byte (e.g. we stopped just before the rename).
            return None
        part.unlink(missing_ok=True)
        return _Retry(f"{_status_text(response)} for a {offset}-byte partial file")

    if status in RETRY_STATUSES:
        return _Retry(_status_text(response), _retry_after(response))

    if status >= 500:
        # A server failure we do not expect to clear within seconds; still transient.
        raise DownloadError(f"{redact_url(url)}: {_status_text(response)}")

    if status not in (200, 206):
        raise SourceError(f"{redact_url(url)}: {_status_text(response)}")

    length = _int_header(response, "Content-Length")
    if status == 206:
        start, end, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            # Not the bytes we asked for; appending them would corrupt the file.
            part.unlink(missing_ok=True)
            return _Retry(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        if length is None and end is not None:
            length = end - start + 1
    else:
        # 200: the server sent the whole file (it ignored or did not get our Range), so the
        # part is started over rather than appended to.
        offset = 0
        total = length

    return _stream_body(response, part, offset, length, total, progress, chunk_size)


def _stream_body(
    response: httpx.Response,
    part: Path,
    offset: int,
    length: int | None,
    total: int | None,
    progress: Progress | None,
    chunk_size: int,
) -> _Retry | None:
    """Write the body to ``part`` at ``offset``; judge whether the file is now complete."""
    limit = total if total is not None else (offset + length if length is not None else None)
    written = offset
    # "ab" after a 206 appends to what we have; "wb" after a 200 truncates it. An exception
    # (connection dropped) leaves every byte received so far on disk for the next Range
    # request; chunk_size only sizes the write buffer.
    with open(part, "ab" if offset else "wb", buffering=chunk_size) as fh:
        # iter_raw: the exact bytes the server stores, never content-decoded. No chunk size:
        # httpx would hold back a partial chunk, and lose it when the connection drops.
        for chunk in response.iter_raw():
            written += len(chunk)
            if limit is not None and written > limit:
                break
            fh.write(chunk)
            if progress is not None:
                progress(written, total)
        else:
            fh.flush()
            os.fsync(fh.fileno())

    if limit is not None and written > limit:
        # More bytes than announced: we cannot tell which are wrong, so nothing is kept.
        part.unlink(missing_ok=True)
        return _Retry(f"received more than the announced {limit} bytes")
    if limit is not None and written < limit:
        # Keep the part: the next attempt resumes from here.
        return _Retry(f"incomplete body: {written} of {limit} bytes")
    return None


# --- the public entry point ----------------------------------------------------------------


def _delay(attempt: int, backoff: float, max_backoff: float, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, max_backoff)
    return min(backoff * 2**attempt, max_backoff)


def _verify_md5(path: Path, expected_md5: str | None) -> str | None:
    """None if ``path`` matches (or nothing is expected), else the actual MD5."""
    if expected_md5 is None:
        return None
    actual = md5_of(path)
    return None if actual == expected_md5.strip().lower() else actual


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    expected_md5: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    progress: Progress | None = None,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Streams into ``<dest>.part`` and resumes it with ``Range`` across retries and across calls.
    Retries 429/500/502/503/504 and transport failures ``retries`` times (a refused connection
    at most `REFUSED_RETRIES` times) with backoff ``backoff * 2**attempt`` (capped at
    ``max_backoff``; a numeric Retry-After wins, same cap), each retry announced as a warning on
    the ``flowerml.download`` logger, then raises `DownloadRetriesExhausted` (a `DownloadError`
    that no outer layer retries again) naming the URL and the cause; an unlisted 5xx raises a
    plain `DownloadError` at once. Any other 4xx, a non-http(s) URL or redirect, a URL without a
    host or with a port outside 1-65535, an unknown host, a certificate that does not verify, an
    https->http redirect, or an MD5 mismatch raises `SourceError` at once. ``dest`` appears
    only once complete and verified. An existing ``dest`` that matches ``expected_md5`` (or any,
    when None) is returned without a request. ``progress(bytes_so_far, total_or_None)`` is
    called as bytes arrive.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    check_url(url)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    safe_url = redact_url(url)

    if dest.exists():
        if _verify_md5(dest, expected_md5) is None:
            return dest
        # A corrupt file must not stay looking complete, whatever happens next.
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False)
    with client:
        _transfer(client, url, part, retries, backoff, max_backoff, progress, chunk_size)

    actual = _verify_md5(part, expected_md5)
    if actual is not None:
        # A finished file with the wrong bytes would only resume into the same wrong file.
        part.unlink(missing_ok=True)
        raise SourceError(
            f"{dest.name}: MD5 mismatch: expected {expected_md5}, got {actual} "
            f"(downloaded from {safe_url})"
        )
    os.replace(part, dest)
    return dest


def _transfer(
    client: httpx.Client,
    url: str,
    part: Path,
    retries: int,
    backoff: float,
    max_backoff: float,
    progress: Progress | None,
    chunk_size: int,
) -> None:
    """Run attempts until ``part`` is complete; DownloadRetriesExhausted once the retries this
    kind of failure allows are spent (``retries``, or `REFUSED_RETRIES` for a refused
    connection), each retry announced on the ``flowerml.download`` logger."""
    done = 0  # retries made so far
    while True:
        try:
            failure = _attempt(client, url, part, progress, chunk_size)
            cause: Exception | None = None
        except _RETRY_EXCEPTIONS as exc:
            failure, cause = _transport_failure(url, exc), exc
        if failure is None:
            return
        allowed = retries if failure.max_retries is None else min(retries, failure.max_retries)
        if done >= allowed:
            raise DownloadRetriesExhausted(
                f"{redact_url(url)}: download failed after {done} retries: {failure.reason}"
            ) from cause
        delay = _delay(done, backoff, max_backoff, failure.retry_after)
        done += 1
        logger.warning("download of %s failed (%s); retry %d of %d in %.1f s",
                       redact_url(url), failure.reason, done, allowed, delay)
        _sleep(delay)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from: httpx wraps httpcore's error, which wraps the
    socket's (ConnectionRefusedError, socket.gaierror, ssl.SSLCertVerificationError)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _failed_host(exc: httpx.RequestError, url: str) -> str:
    """The host of the request that failed (a redirect may have moved it off ``url``'s)."""
    try:
        return exc.request.url.host
    except RuntimeError:  # no request attached
        return urlsplit(url).hostname or ""


_UNKNOWN_HOST = frozenset(code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
                          if code is not None)


def _transport_failure(url: str, exc: httpx.RequestError) -> _Retry:
    """A transport failure in words, as a retry; `SourceError` for one that cannot heal (an
    unknown host, a certificate that does not verify)."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            if cause.errno in _UNKNOWN_HOST:
                raise SourceError(f"{redact_url(url)}: unknown host "
                                  f"'{_failed_host(exc, url)}' (no such name in DNS)") from None
            # EAI_AGAIN and the like: the resolver did not answer, which may pass.
            return _Retry(f"host name lookup failed: {cause.strerror}")
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise SourceError(f"{redact_url(url)}: TLS certificate of "
                              f"'{_failed_host(exc, url)}' does not verify "
                              f"({cause.verify_message})") from None
        if isinstance(cause, ConnectionRefusedError):
            return _Retry("connection refused", max_retries=REFUSED_RETRIES)
        if isinstance(cause, ConnectionResetError):
            return _Retry("connection reset by the server")
    if isinstance(exc, httpx.ConnectTimeout):
        return _Retry("connection timed out")
    if isinstance(exc, httpx.TimeoutException):
        return _Retry("timed out waiting for the server")
    if isinstance(exc, httpx.RemoteProtocolError):
        return _Retry("the server closed the connection mid-response")
    if isinstance(exc, httpx.ProxyError):
        return _Retry("the proxy failed")
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:  # "Network is unreachable", ...
            return _Retry(cause.strerror[0].lower() + cause.strerror[1:])
    return _Retry(type(exc).__name__)
