"""A real `mlflow server` for the tracking tests: sqlite backend and artifacts under a temporary
folder, on a free 127.0.0.1 port, one uvicorn worker; it can be killed and started again on the
same port and database (a server that goes away mid-run)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.network import free_port, wait_for_http

START_TIMEOUT = 240
"""Seconds an `mlflow server` may take to answer /health: it imports all of MLflow twice (its
CLI, then its uvicorn worker), which takes a minute on a busy 2-core machine."""


class MlflowServer:
    """One `mlflow server` process; `url` stays the same across `kill()` and `start()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts")]

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        with open(log, "wb") as out:
            # env derived from os.environ: the reaper's mark reaches the uvicorn worker too
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for_http(f"{self.url}/health", self.process, timeout=START_TIMEOUT, log=log)

    def kill(self) -> None:
        """SIGKILL the server and its worker (its own process group): gone at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()


@contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.kill()
