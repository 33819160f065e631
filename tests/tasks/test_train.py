"""The train and evaluate tasks under Prefect: child process, progress artifact, report artifacts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from flowerml.core.recipes import build_config
from flowerml.data.ingest import ingest
from flowerml.data.source_files import FetchOptions
from flowerml.io.storage_local import LocalStore
from tasks.evaluate import evaluate_task, inline_images
from tasks.train import child_arguments, flow_run_tag, progress_artifact, train_task
from tests.helpers.prefect_runs import task_outcome

# The task takes a whole TrainConfig (the flow resolves the recipe before any work starts).
# MobileNetV3-Small at 32 px: the tasks' work around the child is the point, not the model.
TINY = build_config("demo", arch="mobilenet_v3_small", epochs=2, image_size=32,
                    batch_size=8).to_json()
ON_CPU = {"device": "cpu", "workers": 0}


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


def test_child_arguments_carry_the_config_as_json() -> None:
    assert child_arguments("r1", '{"epochs": 2}', store="s3://b/p", workers=None, device="cpu") \
        == ["--run-id", "r1", "--json-progress", "--json", "--config", '{"epochs": 2}',
            "--store", "s3://b/p", "--device", "cpu"]


def test_the_child_checkpoints_as_often_as_the_task_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """`checkpoint_every` reaches `flowerml train` as --checkpoint-every; the default (every
    epoch) adds nothing to its command line."""
    import tasks.train as train_module

    commands: list[list[str]] = []
    monkeypatch.setattr(train_module, "run_training_child",
                        lambda run_id, command, timeout_s: commands.append(command) or {})
    train_task.fn("every-5", TINY, checkpoint_every=5, **ON_CPU)
    train_task.fn("every-1", TINY, **ON_CPU)
    every_5, every_1 = commands
    assert every_5[every_5.index("--checkpoint-every") + 1] == "5"
    assert "--checkpoint-every" not in every_1


def test_the_mlflow_tag_links_the_flow_run(prefect_harness: None) -> None:
    """The training child's MLflow run is tagged with the flow run's UI page, or its id when
    Prefect knows no UI URL; nothing outside a flow run."""
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    @flow
    def tagged() -> tuple:
        from prefect.runtime import flow_run

        return flow_run_tag(), flow_run.id

    with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.example:4200"}):
        tag, flow_run_id = tagged()
    assert tag == f"prefect.flow_run_url=http://prefect.example:4200/flow-runs/flow-run/{flow_run_id}"
    with temporary_settings(restore_defaults={PREFECT_UI_URL}, updates={PREFECT_UI_URL: ""}):
        tag, flow_run_id = tagged()
    assert tag == f"prefect.flow_run_id={flow_run_id}"
    assert flow_run_tag() is None


@pytest.mark.slow
def test_train_then_evaluate_with_artifacts(prefect_harness: None, published: Path) -> None:
    @flow
    def train_and_evaluate() -> tuple:
        from prefect.runtime import flow_run

        trained = train_task("task-run", TINY, store=str(published), **ON_CPU)
        evaluated = evaluate_task("task-run", store=str(published), artifact_prefix="flowers102")
        return trained, evaluated, flow_run.id

    trained, evaluated, flow_run_id = train_and_evaluate()
    assert trained["run_id"] == "task-run" and trained["epochs_run"] == 2
    assert evaluated["n"] == 8
    assert evaluated["report"] == f"{published}/runs/task-run/eval/test/report.md"
    artifacts = artifacts_of(flow_run_id)
    assert sorted((a.type, a.key) for a in artifacts) == [
        ("markdown", "flowers102-evaluation-report"), ("progress", None),
        ("table", "flowers102-per-class-accuracy")]
    progress = next(a for a in artifacts if a.type == "progress")
    assert progress.data == 100.0
    report = next(a for a in artifacts if a.type == "markdown").data
    assert_inline_pngs(report, ["Confusion matrix (row-normalised)", "Training curves"])


def assert_inline_pngs(markdown: str, captions: list[str]) -> None:
    """What the Prefect UI is given: each plot as a data URI that decodes to a real PNG."""
    import base64
    import io
    import re

    from PIL import Image

    found = dict(re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)",
                            markdown))
    assert sorted(found) == sorted(captions), markdown[:2000]
    for data in found.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100
    assert ".png)" not in markdown  # no relative link left for the UI to break on


def test_inline_images_replaces_relative_links_only() -> None:
    read = {"confusion.png": b"\x89PNG-a", "my plot.png": b"\x89PNG-b"}.__getitem__
    text = inline_images("![A](confusion.png) ![B](<my plot.png>) ![C](https://x/y.png)", read)
    assert text.startswith("![A](data:image/png;base64,iVBORy1h)")
    assert "![B](data:image/png;base64,iVBORy1i)" in text and "![C](https://x/y.png)" in text


@pytest.mark.slow
def test_a_retry_moves_the_same_progress_artifact(prefect_harness: None) -> None:
    """A retried attempt reuses its task run's progress bar instead of leaving one at 25%."""
    from prefect import task
    from prefect.artifacts import update_progress_artifact

    attempts: list = []

    @task(retries=1, retry_delay_seconds=0)
    def flaky() -> None:
        artifact = progress_artifact("flaky")
        attempts.append(artifact)
        if len(attempts) == 1:
            update_progress_artifact(artifact, 25.0)
            raise RuntimeError("crash after one epoch")
        update_progress_artifact(artifact, 100.0)

    @flow
    def retried():
        from prefect.runtime import flow_run

        flaky()
        return flow_run.id

    flow_run_id = retried()
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    progress = [a for a in artifacts_of(flow_run_id) if a.type == "progress"]
    assert [a.data for a in progress] == [100.0]


@pytest.mark.slow
def test_refused_input_is_not_retried(prefect_harness: None, published: Path) -> None:
    @flow
    def bad() -> tuple:
        return task_outcome(train_task.with_options(retry_delay_seconds=0)(
            "bad-run", {**TINY, "arch": "resnet9"}, store=str(published), **ON_CPU,
            return_state=True))

    failed, message, runs = bad()
    assert failed and "--arch must be one of" in message
    assert runs == 1


@pytest.mark.slow
def test_a_resumed_attempt_moves_the_bar_its_crashed_predecessor_left(
        prefect_harness: None) -> None:
    """A flow-run attempt that was killed left its training's bar at 25% in another task run:
    the attempt that resumes the same training run moves that bar; another run gets its own."""
    from prefect import task
    from prefect.artifacts import update_progress_artifact

    @task
    def killed_attempt() -> object:
        artifact = progress_artifact("resumed")
        update_progress_artifact(artifact, 25.0)
        return artifact

    @task
    def resuming_attempt() -> object:
        artifact = progress_artifact("resumed")
        update_progress_artifact(artifact, 100.0)
        return artifact

    @flow
    def recovered():
        from prefect.runtime import flow_run

        return (killed_attempt(), resuming_attempt(), progress_artifact("another"),
                flow_run.id)

    first, second, other, flow_run_id = recovered()
    assert first == second and other != first
    progress = {a.id: a.data for a in artifacts_of(flow_run_id) if a.type == "progress"}
    assert progress == {first: 100.0, other: 0.0}
