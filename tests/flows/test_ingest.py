"""The ingest flow end to end under Prefect's test harness, against moto's S3 endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow

from flowerml.io.storage import S3Options
from flowerml.io.storage_s3 import S3Store
from flows.ingest import ingest_flowers
from tasks.ingest import fetch_sources_task
from tests.helpers.network import free_port
from tests.helpers.prefect_runs import task_outcome as outcome
from tests.helpers.stores import store_keys

pytestmark = pytest.mark.slow  # Prefect's test server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))


def test_ingest_flow_publishes_to_s3(prefect_harness: None, s3_env: None, s3_bucket: str,
                                     moto_endpoint: str, synthetic_source: Path) -> None:
    state = ingest_flowers(source=str(synthetic_source), store=f"s3://{s3_bucket}/ml",
                           return_state=True)
    summary = state.result()
    assert flow_run_name(state) == f"ingest flowers102 from {synthetic_source}"  # not "None"
    assert summary["counts"] == {"train": 8, "valid": 8, "test": 8}
    assert summary["uploaded"] == 24 and summary["store"] == f"s3://{s3_bucket}/ml"
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))
    current = json.loads(store.get_bytes("datasets/flowers102/CURRENT"))
    assert current["version"] == summary["version"]
    again = ingest_flowers(source=str(synthetic_source), store=f"s3://{s3_bucket}/ml")
    assert (again["uploaded"], again["skipped"], again["version"]) == (0, 24, summary["version"])


def flow_run_name(state) -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).name

    return asyncio.run(read())


def test_bad_input_fails_once_without_retry(prefect_harness: None, s3_env: None, s3_bucket: str,
                                            moto_endpoint: str, source_copy: Path) -> None:
    (source_copy / "setid.mat").write_bytes(b"<html>not found</html>")

    @flow
    def probe():
        return outcome(fetch_sources_task.with_options(retry_delay_seconds=0)(
            str(source_copy), store=f"s3://{s3_bucket}/ml", return_state=True))

    failed, message, runs = probe()
    assert failed and "setid.mat: is an HTML page" in message
    assert runs == 1
    assert store_keys(S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))) == []


def test_unreachable_store_fails_once_after_botocores_retries(prefect_harness: None, s3_env: None,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 synthetic_source: Path) -> None:

    port = free_port()
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")

    @flow
    def probe():
        return outcome(fetch_sources_task.with_options(retries=2, retry_delay_seconds=0)(
            str(synthetic_source), store="s3://bucket/ml", return_state=True))

    failed, message, runs = probe()
    assert failed and f"cannot reach S3 endpoint http://127.0.0.1:{port}" in message
    assert runs == 1  # botocore retried already; the task does not multiply its attempts
