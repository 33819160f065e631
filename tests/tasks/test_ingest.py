"""The fetch task's retry policy: HTTP downloads are retried by flowerml.io.download only.

A real HTTP server on 127.0.0.1 counts the requests it answers; the task runs under the
session's Prefect test harness and its run count is read back from the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flowerml.data import flowers
from flowerml.io.storage_local import LocalStore
from tasks.ingest import add_images_task, fetch_sources_task, publish_split_task
from tests.helpers.additions import class_folders
from tests.helpers.synthetic import DATASET, SMALL_SPEC, SyntheticData, publish_copy

DOWNLOAD_RETRIES = 2
TASK_RETRIES = 3  # more than enough to show a multiplication if there were one


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            server.paths.append(self.path)  # type: ignore[attr-defined]
        body = b"try later\n"
        # Retry-After: 0 keeps the library's backoff out of the test's run time, and shows
        # that the server's own hint is what the library waits for.
        self.send_response(server.status)  # type: ignore[attr-defined]
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_source() -> Iterator[ThreadingHTTPServer]:
    """A source server that answers every request with `server.status` (503 unless set)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    httpd.daemon_threads = True
    httpd.status = 503  # type: ignore[attr-defined]
    httpd.paths = []  # type: ignore[attr-defined]
    httpd.lock = threading.Lock()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWERML_DOWNLOAD_RETRIES", str(DOWNLOAD_RETRIES))
    monkeypatch.setenv("FLOWERML_DOWNLOAD_TIMEOUT", "5")
    return tmp_path / "store"


def run_count(task_run_id, timeout: float = 30.0) -> int:
    """The task run's run count as the server recorded it.

    Task runs reach the server as events, so the record may lag the state in hand by a moment.
    """

    async def read() -> int:
        deadline = time.monotonic() + timeout
        async with get_client() as client:
            while True:
                try:
                    task_run = await client.read_task_run(task_run_id)
                    if task_run.state is not None and task_run.state.is_final():
                        return task_run.run_count
                except ObjectNotFound:
                    pass
                assert time.monotonic() < deadline, f"task run {task_run_id} never recorded"
                await asyncio.sleep(0.1)

    return asyncio.run(read())


def run_fetch(source: str, store: Path) -> tuple[bool, str, int]:
    """(failed, message, run count) of one fetch task run with TASK_RETRIES retries."""

    @flow
    def probe() -> tuple[bool, str, object]:
        state = fetch_sources_task.with_options(retries=TASK_RETRIES, retry_delay_seconds=0)(
            source, store=str(store), return_state=True)
        return state.is_failed(), state.message or "", state.state_details.task_run_id

    failed, message, task_run_id = probe()
    return failed, message, run_count(task_run_id)


@pytest.mark.slow
def test_http_503_is_retried_by_the_download_alone(prefect_harness: None, env: Path,
                                                   http_source: ThreadingHTTPServer) -> None:
    source = f"http://127.0.0.1:{http_source.server_address[1]}/flowers"

    failed, message, runs = run_fetch(source, env)

    assert failed
    assert f"after {DOWNLOAD_RETRIES} retries: HTTP 503" in message
    # The library's loop owns the policy: FLOWERML_DOWNLOAD_RETRIES + 1 requests, one task run.
    assert http_source.paths == [f"/flowers/{flowers.ARCHIVE}"] * (DOWNLOAD_RETRIES + 1)
    assert runs == 1
    assert not env.exists() or not any(env.rglob("*.tgz"))


@pytest.mark.slow
def test_a_failure_the_download_did_not_retry_is_retried_by_the_task(
        prefect_harness: None, env: Path, http_source: ThreadingHTTPServer) -> None:
    # 501 is transient but outside the library's retry list: only the task layer retries it.
    http_source.status = 501  # type: ignore[attr-defined]
    source = f"http://127.0.0.1:{http_source.server_address[1]}/flowers"

    failed, message, runs = run_fetch(source, env)

    assert failed and "HTTP 501" in message
    assert runs == TASK_RETRIES + 1
    assert len(http_source.paths) == TASK_RETRIES + 1


@pytest.mark.slow
def test_a_404_is_tried_once_by_both_layers(prefect_harness: None, env: Path,
                                            http_source: ThreadingHTTPServer) -> None:
    http_source.status = 404  # type: ignore[attr-defined]
    source = f"http://127.0.0.1:{http_source.server_address[1]}/flowers"

    failed, message, runs = run_fetch(source, env)

    assert failed and "HTTP 404" in message
    assert (runs, len(http_source.paths)) == (1, 1)


def test_a_new_version_is_announced_once_and_nothing_new_is_not(
        prefect_harness: None, monkeypatch: pytest.MonkeyPatch, local_store: LocalStore,
        synthetic_data: SyntheticData, tmp_path: Path) -> None:
    """retrain-on-new-data listens for `flowerml.dataset.published`: an add that published a
    version says so once; the same add again, or the same archive ingested again, says nothing."""
    import tasks.ingest as ingest_tasks

    published = publish_copy(synthetic_data.published(SMALL_SPEC) / "store", local_store)
    emitted: list[dict] = []
    monkeypatch.setattr(ingest_tasks, "emit_event", lambda **event: emitted.append(event))
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    source = str(class_folders(tmp_path / "new", {"1": 2}))

    @flow
    def add() -> dict:
        return add_images_task(source, DATASET, "train", str(local_store.root))

    @flow
    def ingest_again() -> dict:
        return publish_split_task(DATASET, str(local_store.root))

    first, again, reingested = add(), add(), ingest_again()
    assert first["published"] and not again["published"]
    assert reingested["current"] == first["version"]  # the addition stays CURRENT
    assert emitted == [{
        "event": "flowerml.dataset.published",
        "resource": {"prefect.resource.id": f"flowerml.dataset.{DATASET}",
                     "prefect.resource.name": DATASET},
        "payload": {"version": first["version"], "parent": published.version,
                    "added": {"train": 2}, "store": local_store.uri}}]
