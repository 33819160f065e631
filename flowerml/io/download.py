"""Fetching one file over HTTP(S) into a local path, safely.

This module owns the transfer itself: streaming to ``<dest>.part``, resuming with ``Range``,
retrying transient failures with capped exponential backoff, refusing redirects that downgrade
https to http (`flowerml.io.urls.check_redirect`, checked before each hop is requested), verifying
the MD5 and only then moving the file into place with ``os.replace``.

Bad input (a 404, a non-http scheme, a URL without a host or with a port outside 1-65535, an
unknown host, a TLS certificate that does not verify, a wrong checksum) raises `SourceError` at
once; a failure that may pass later (5xx, throttling, a flaky connection, a timeout) raises
`DownloadRetriesExhausted` once the retries are spent.

This loop is the only layer that retries an HTTP download; which failures it retries, how
often and after how long is `flowerml.io.download_retries`. Each retry is announced as it happens
by a warning on the ``flowerml.io.download`` logger, naming the URL (redacted), the cause in words
and the delay; the final error names them too. Its failure after the retries is a
`RetriesExhausted`, which the Prefect fetch task does not retry again (else the attempts
multiply: retries+1 requests per task run, times the task's runs). A transient failure this
loop does not retry (an unlisted 5xx such as 501) is a plain `DownloadError`, which the task
layer may retry.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from flowerml.core.errors import DownloadError, DownloadRetriesExhausted, SourceError
from flowerml.core.files import md5_file
from flowerml.io.download_retries import (
    RETRY_EXCEPTIONS,
    RETRY_STATUSES,
    Retry,
    delay,
    retry_after,
    transport_failure,
)
from flowerml.io.urls import check_redirect, check_url, redact_url

logger = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]

MAX_REDIRECTS = 20

# Indirection so tests can observe the backoff delays without sleeping.
_sleep = time.sleep


# --- one attempt ---------------------------------------------------------------------------


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
) -> Retry | None:
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
) -> Retry | None:
    """Act on one (non-redirect) response to a request for ``part`` from ``offset``."""
    status = response.status_code

    if status == 416 and offset:
        _, _, total = _parse_content_range(response.headers.get("Content-Range"))
        if total == offset:
            # The part already holds every byte (e.g. we stopped just before the rename).
            return None
        part.unlink(missing_ok=True)
        return Retry(f"{_status_text(response)} for a {offset}-byte partial file")

    if status in RETRY_STATUSES:
        return Retry(_status_text(response), retry_after(response))

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
            return Retry(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
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
) -> Retry | None:
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
        return Retry(f"received more than the announced {limit} bytes")
    if limit is not None and written < limit:
        # Keep the part: the next attempt resumes from here.
        return Retry(f"incomplete body: {written} of {limit} bytes")
    return None


# --- the public entry point ----------------------------------------------------------------


def _verify_md5(path: Path, expected_md5: str | None) -> str | None:
    """None if ``path`` matches (or nothing is expected), else the actual MD5."""
    if expected_md5 is None:
        return None
    actual = md5_file(path)
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
    at most `REFUSED_RETRIES` times: `flowerml.io.download_retries`) with backoff
    ``backoff * 2**attempt`` (capped at ``max_backoff``; a numeric Retry-After wins, same cap),
    each retry announced as a warning on the ``flowerml.io.download`` logger, then raises
    `DownloadRetriesExhausted` (a `DownloadError` that no outer layer retries again) naming the
    URL and the cause; an unlisted 5xx raises a plain `DownloadError` at once. Any other 4xx, a non-http(s) URL or redirect, a URL without a
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
    connection), each retry announced on the ``flowerml.io.download`` logger."""
    done = 0  # retries made so far
    while True:
        try:
            failure = _attempt(client, url, part, progress, chunk_size)
            cause: Exception | None = None
        except RETRY_EXCEPTIONS as exc:
            failure, cause = transport_failure(url, exc), exc
        if failure is None:
            return
        allowed = failure.allowed(retries)
        if done >= allowed:
            raise DownloadRetriesExhausted(
                f"{redact_url(url)}: download failed after {done} retries: {failure.reason}"
            ) from cause
        wait = delay(done, backoff, max_backoff, failure.retry_after)
        done += 1
        logger.warning("download of %s failed (%s); retry %d of %d in %.1f s",
                       redact_url(url), failure.reason, done, allowed, wait)
        _sleep(wait)
