"""URLs as flowerml may request them and name them.

`url_problem` / `check_url` say whether a URL can be requested at all (http or https, a host,
a port in 1-65535): such a URL fails the same way every time, so it is refused before any
request. `check_redirect` vets one hop of a redirect (no other scheme, no https -> http
downgrade). `redact_url` strips what must never appear in a message or a log line: the
``user:pass@`` and the query string (presigned URLs carry their signature there).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import httpx

from flowerml.core.errors import SourceError

ALLOWED_SCHEMES = frozenset({"http", "https"})
NOT_HTTP = "is not an http(s) URL"
INVALID_PORT = "has an invalid port (ports are 1-65535)"


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


def scheme_of(url: str | httpx.URL) -> str:
    """The URL's scheme in lower case; empty when it has none or does not parse."""
    try:
        return urlsplit(str(url)).scheme.lower()
    except ValueError:
        return ""


def url_problem(url: str | httpx.URL) -> str | None:
    """Why ``url`` cannot be requested, or None: not http(s), no host, a port outside 1-65535.

    Such a URL fails the same way every time: retrying it would only delay the error.
    """
    if scheme_of(url) not in ALLOWED_SCHEMES:
        return NOT_HTTP
    try:
        parts = urlsplit(str(url))
        port = parts.port  # raises for 99999 or a non-number
    except ValueError:
        return INVALID_PORT
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return INVALID_PORT
    return None


def check_url(url: str | httpx.URL) -> None:
    """Raise `SourceError` unless ``url`` is an absolute http or https URL that names a host
    (and a port in 1-65535, if any)."""
    problem = url_problem(url)
    if problem == NOT_HTTP:
        raise SourceError(f"{redact_url(url)}: only http and https URLs can be downloaded")
    if problem:
        raise SourceError(f"{redact_url(url)}: {problem}")


def check_redirect(from_url: str | httpx.URL, to_url: str | httpx.URL) -> None:
    """Raise `SourceError` if following ``from_url -> to_url`` is unsafe.

    Unsafe means a scheme other than http(s), or https downgraded to http (which would expose
    the transfer, and any credentials, to anyone on the path).
    """
    if scheme_of(to_url) not in ALLOWED_SCHEMES:
        raise SourceError(
            f"{redact_url(from_url)}: refusing redirect to non-http(s) URL {redact_url(to_url)}"
        )
    if scheme_of(from_url) == "https" and scheme_of(to_url) == "http":
        raise SourceError(
            f"{redact_url(from_url)}: refusing redirect that downgrades https to http "
            f"({redact_url(to_url)})"
        )
