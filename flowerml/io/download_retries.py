"""The retry policy of an HTTP download: which failures may heal, how long to wait before the
next attempt, and how each failure is named.

`flowerml.io.download` is the only layer that retries an HTTP download, and it asks this module
what to do with each failed attempt. Worth retrying: the statuses of `RETRY_STATUSES` (429,
500, 502, 503, 504) and transport failures (timeouts, resets, dropped connections, a DNS
server that did not answer), up to the caller's ``retries``; a refused connection (the host
answered and nothing listens on that port: a wrong port, a stopped server) at most
`REFUSED_RETRIES` times, in case the server is restarting. Not worth it: an unknown host or a
TLS certificate that does not verify, which `transport_failure` raises as `SourceError` at
once. The delay doubles from ``backoff`` up to ``max_backoff``; a numeric Retry-After wins,
under the same cap.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from flowerml.core.errors import SourceError
from flowerml.io.urls import redact_url

# Statuses that say "try again later" rather than "this URL is wrong".
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REFUSED_RETRIES = 2
"""Retries for a refused connection (about 3 s at the default backoff), whatever ``retries``."""

# Transport failures worth a look: `transport_failure` says which of them may heal.
# LocalProtocolError and UnsupportedProtocol are left out on purpose: they are our own mistakes
# and would fail the same way every time.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)

_UNKNOWN_HOST = frozenset(code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
                          if code is not None)


@dataclass(frozen=True)
class Retry:
    """An attempt that failed in a way worth retrying."""

    reason: str
    retry_after: float | None = None
    max_retries: int | None = None
    """A lower cap than ``retries`` for this kind of failure (a refused connection)."""

    def allowed(self, retries: int) -> int:
        """How many retries this kind of failure gets when the caller allows ``retries``."""
        return retries if self.max_retries is None else min(retries, self.max_retries)


def retry_after(response: httpx.Response) -> float | None:
    """The response's Retry-After in seconds, when it is a number."""
    # Only the numeric form: an HTTP-date would need the server's clock to agree with ours.
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def delay(attempt: int, backoff: float, max_backoff: float, retry_after: float | None) -> float:
    """Seconds to wait before retry number ``attempt + 1``."""
    if retry_after is not None:
        return min(retry_after, max_backoff)
    return min(backoff * 2**attempt, max_backoff)


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


def transport_failure(url: str, exc: httpx.RequestError) -> Retry:
    """A transport failure in words, as a retry; `SourceError` for one that cannot heal (an
    unknown host, a certificate that does not verify)."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            if cause.errno in _UNKNOWN_HOST:
                raise SourceError(f"{redact_url(url)}: unknown host "
                                  f"'{_failed_host(exc, url)}' (no such name in DNS)") from None
            # EAI_AGAIN and the like: the resolver did not answer, which may pass.
            return Retry(f"host name lookup failed: {cause.strerror}")
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise SourceError(f"{redact_url(url)}: TLS certificate of "
                              f"'{_failed_host(exc, url)}' does not verify "
                              f"({cause.verify_message})") from None
        if isinstance(cause, ConnectionRefusedError):
            return Retry("connection refused", max_retries=REFUSED_RETRIES)
        if isinstance(cause, ConnectionResetError):
            return Retry("connection reset by the server")
    if isinstance(exc, httpx.ConnectTimeout):
        return Retry("connection timed out")
    if isinstance(exc, httpx.TimeoutException):
        return Retry("timed out waiting for the server")
    if isinstance(exc, httpx.RemoteProtocolError):
        return Retry("the server closed the connection mid-response")
    if isinstance(exc, httpx.ProxyError):
        return Retry("the proxy failed")
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:  # "Network is unreachable", ...
            return Retry(cause.strerror[0].lower() + cause.strerror[1:])
    return Retry(type(exc).__name__)
