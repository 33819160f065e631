"""What `flowerml retrain` checks before anything starts (flows/preflight.py): here the Prefect
API named by PREFECT_API_URL, asked once through the Prefect client's own health check, each
failure one line naming the URL and the cause. The option refusals are tested through the
command in test_retrain_command.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.settings import temporary_settings

import flows.preflight as preflight
from flowerml.cli import CliError
from flows.preflight import check_prefect_api


class Answers(BaseHTTPRequestHandler):
    """GET /health: `status`, or 200 only to the API key `key`; `hang` answers nothing."""

    status = 200
    key: str | None = None
    hang = False
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        if self.hang:
            time.sleep(3)
            return
        status = self.status
        if self.key is not None and self.headers.get("Authorization") != f"Bearer {self.key}":
            status = 401
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[tuple[str, type[Answers]]]:
    """A local HTTP server standing for a Prefect API, and the handler class to configure."""
    handler = type("Handler", (Answers,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", handler
    server.shutdown()
    server.server_close()


def refused(url: str, **settings: object) -> CliError:
    with temporary_settings(updates={"api.url": url, **settings}), \
            pytest.raises(CliError) as raised:
        check_prefect_api()
    return raised.value


def test_a_server_that_answers_passes(fake_api) -> None:
    url, handler = fake_api
    with temporary_settings(updates={"api.url": url}):
        check_prefect_api()
    assert handler.requests == ["/api/health"]


def test_the_profiles_api_key_is_sent(fake_api) -> None:
    url, handler = fake_api
    handler.key = "s3cret-key"
    with temporary_settings(updates={"api.url": url, "api.key": "s3cret-key"}):
        check_prefect_api()
    error = refused(url, **{"api.key": "another-key"})
    assert str(error) == (f"Prefect API {url} (PREFECT_API_URL) answered HTTP 401 to GET "
                          f"/health: is it a Prefect server's API URL (http://HOST:4200/api)?")
    assert error.kind == "bad-input" and "another-key" not in str(error)


def test_a_server_error_is_asked_once_not_retried(fake_api) -> None:
    """The Prefect client retries a 503 five times with back-off (a minute): asked once."""
    url, handler = fake_api
    handler.status = 503
    started = time.monotonic()
    error = refused(url)
    assert time.monotonic() - started < 5
    assert "answered HTTP 503 to GET /health" in str(error) and error.kind == "unavailable"
    assert handler.requests == ["/api/health"]


def test_a_server_that_does_not_answer_is_one_line(fake_api,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = fake_api
    handler.hang = True
    monkeypatch.setattr(preflight, "PREFECT_API_TIMEOUT_S", 0.5)
    started = time.monotonic()
    error = refused(url)
    assert time.monotonic() - started < 3
    assert str(error).startswith(f"Prefect API {url} (PREFECT_API_URL) is unreachable: no "
                                 f"answer within 0.5 s; start that server")
    assert error.kind == "unavailable" and handler.requests == ["/api/health"]


def test_a_closed_port_is_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    error = refused(url)
    assert str(error) == (f"Prefect API {url} (PREFECT_API_URL) is unreachable: connection "
                          f"refused; start that server, correct the URL, or unset "
                          f"PREFECT_API_URL to run with a temporary local server")
    assert error.kind == "unavailable"


def test_a_url_that_cannot_be_requested_is_refused_before_asking() -> None:
    error = refused("ftp://prefect.example/api")
    assert str(error) == "PREFECT_API_URL ftp://prefect.example/api is not an http(s) URL"
