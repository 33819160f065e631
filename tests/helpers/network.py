"""Loopback networking in tests: a port nothing listens on, and waiting for a server to answer."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on (connecting to it is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process, timeout: float = 120, log: Path | None = None) -> None:
    """Poll `url` until it answers, failing early if the serving `process` died."""
    # Direct: urlopen's shared opener may hold a proxy a test set (see test_weights.py).
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            direct.open(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (even 403 from an auth-enforcing server) means it is up
        except OSError:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            assert process.poll() is None, f"server for {url} exited:\n{tail}"
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
            time.sleep(0.3)
