"""The train and evaluate tasks under Prefect: child process, progress artifact, report artifacts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from flowerml.ingest import FetchOptions, ingest
from flowerml.storage import LocalStore
from tasks.evaluate import evaluate_task
from tasks.train import option_arguments, train_task
from tests.conftest import task_outcome

TINY = {"recipe": "demo", "epochs": 2, "image_size": 40, "batch_size": 8, "device": "cpu",
        "workers": 0}


@pytest.fixture
def published(tmp_path: Path, synthetic_source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "store")
    ingest(str(synthetic_source), store, "flowers102", tmp_path / "cache", FetchOptions())
    return store.root


def artifacts_of(flow_run_id) -> list:
    async def read() -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_option_arguments() -> None:
    assert option_arguments({"batch_size": 8, "amp": False, "lr": None, "compile": True}) == [
        "--batch-size", "8", "--no-amp", "--compile"]


def test_train_then_evaluate_with_artifacts(prefect_harness: None, published: Path) -> None:
    @flow
    def train_and_evaluate() -> tuple:
        from prefect.runtime import flow_run

        trained = train_task("task-run", TINY, store=str(published))
        evaluated = evaluate_task("task-run", store=str(published))
        return trained, evaluated, flow_run.id

    trained, evaluated, flow_run_id = train_and_evaluate()
    assert trained["run_id"] == "task-run" and trained["epochs_run"] == 2
    assert evaluated["n"] == 8 and evaluated["report"] == "runs/task-run/eval/test/report.md"
    kinds = sorted(a.type for a in artifacts_of(flow_run_id))
    assert kinds == ["markdown", "progress", "table"]
    progress = next(a for a in artifacts_of(flow_run_id) if a.type == "progress")
    assert progress.data == 100.0


def test_refused_input_is_not_retried(prefect_harness: None, published: Path) -> None:
    @flow
    def bad() -> tuple:
        return task_outcome(train_task.with_options(retry_delay_seconds=0)(
            "bad-run", {**TINY, "arch": "resnet9"}, store=str(published), return_state=True))

    failed, message, runs = bad()
    assert failed and "--arch must be one of" in message
    assert runs == 1
