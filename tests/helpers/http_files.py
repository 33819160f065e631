"""A scripted HTTP file server on 127.0.0.1 for the download tests: each request gets the next
behaviour of a script (serve the file, drop the connection after n bytes, answer a status, a
raw 206), and every request is recorded (path, Range, headers). `scripted_server` runs one for
a `with` block; `record_download_sleeps` records flowerml.io.download's backoff delays."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flowerml.io import download

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes: several chunks at chunk_size=4096
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2
FAST = {"backoff": 0.01, "max_backoff": 0.05, "chunk_size": 4096, "timeout": 5.0}

Behaviour = Callable[[BaseHTTPRequestHandler], None]


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


class ScriptedHandler(BaseHTTPRequestHandler):
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


@contextmanager
def scripted_server() -> Iterator[Server]:
    """A ScriptedHandler server on a free loopback port, shut down on exit."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
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


def record_download_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every backoff delay flowerml.io.download sleeps (and still sleep it: they are tiny
    with FAST)."""
    delays: list[float] = []
    real = download._sleep

    def record(seconds: float) -> None:
        delays.append(seconds)
        real(seconds)

    monkeypatch.setattr(download, "_sleep", record)
    return delays
