"""flowerml.io.urls: which URLs may be requested, which redirects followed, and what of a URL a
message may show."""

from __future__ import annotations

import pytest

from flowerml.core.errors import SourceError
from flowerml.io.urls import check_redirect, check_url, redact_url, url_problem


@pytest.mark.parametrize(("url", "problem"), [
    ("https://host.example/x.tgz", None),
    ("HTTP://host.example:8080/x.tgz", None),
    ("ftp://host.example/x.tgz", "is not an http(s) URL"),
    ("host.example/x.tgz", "is not an http(s) URL"),
    ("", "is not an http(s) URL"),
    ("http://host.example:99999/x", "has an invalid port (ports are 1-65535)"),
    ("http://host.example:0/x", "has an invalid port (ports are 1-65535)"),
    ("http://host.example:http/x", "has an invalid port (ports are 1-65535)"),
    ("https:///x.tgz", "has no host"),
])
def test_url_problem_says_why_a_url_cannot_be_requested(url: str, problem: str | None):
    assert url_problem(url) == problem


def test_check_url_names_the_url_without_its_credentials():
    with pytest.raises(SourceError) as err:
        check_url("ftp://alice:s3cr3t@example.org/f")
    assert str(err.value) == "ftp://example.org/f: only http and https URLs can be downloaded"
    with pytest.raises(SourceError) as err:
        check_url("https://alice:s3cr3t@example.org:0/f?X-Amz-Signature=abc")
    assert str(err.value) == ("https://example.org:0/f?<redacted>: has an invalid port "
                              "(ports are 1-65535)")
    check_url("https://example.org/f")


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


def test_redact_url_strips_userinfo_and_query():
    assert redact_url("https://u:p@host:8443/a/b.tgz?X-Amz-Signature=abc#frag") == (
        "https://host:8443/a/b.tgz?<redacted>"
    )
    assert redact_url("https://host/x.tgz") == "https://host/x.tgz"
