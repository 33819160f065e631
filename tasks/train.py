"""The training task: `flowerml train` in a child process, its progress in Prefect.

The config is validated here, in the parent, and handed to the child as JSON. Progress lines
become log lines and one progress artifact per task run (a retry moves the same bar, it does
not leave a stale one behind); cancellation, timeout or any error stops the child's whole
process group. A retry re-runs the same run id, which resumes from the last checkpoint, so
only crashes and timeouts are retried, never refused input.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flowerml.core.launch import check_outcome, iter_events, run_child, train_command
from flowerml.core.recipes import load_config
from tasks.common import retry_transient


def progress_artifact(run_id: str) -> UUID:
    """The progress artifact of training run `run_id` in this flow run: the one an earlier
    attempt made (a task retry, or a flow-run attempt that crashed and was resumed), or a new
    one. The resumed training moves the same bar, so no stale bar is left behind."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    description = f"Training run {run_id}"
    with get_client(sync_client=True) as client:
        existing = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
            type=ArtifactFilterType(any_=["progress"])))
    for artifact in existing:
        if artifact.description == description:
            return artifact.id
    return create_progress_artifact(progress=0.0, description=description)


class ProgressReporter:
    """Turns the child's output into log lines, a progress artifact and the final result."""

    def __init__(self, run_id: str) -> None:
        self.logger = get_run_logger()
        self.artifact = progress_artifact(run_id)
        self.result: dict[str, Any] | None = None

    def __call__(self, line: str) -> None:
        events = list(iter_events([line]))
        if not events:
            self.logger.info("%s", line)
            return
        event = events[0]
        if "event" not in event:
            self.result = event
        elif event["event"] == "epoch":
            update_progress_artifact(self.artifact, 100.0 * event["epoch"] / event["epochs"])
            self.logger.info("epoch %s/%s: %s", event["epoch"], event["epochs"],
                             json.dumps({k: v for k, v in event.items() if k != "event"}))
        else:
            self.logger.info("%s", json.dumps(event))


def child_arguments(run_id: str, config_json: str, **options: Any) -> list[str]:
    """`flowerml train` arguments: the run, the config as JSON, and the options that are set."""
    arguments = ["--run-id", run_id, "--json-progress", "--json", "--config", config_json]
    for name, value in options.items():
        if value is not None:
            arguments += ["--" + name.replace("_", "-"), str(value)]
    return arguments


@task(name="train", task_run_name="train {run_id}", retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_transient)
def train_task(run_id: str, config: dict[str, Any], store: str | None = None,
               dataset: str | None = None, dataset_version: str | None = None,
               device: str = "auto", workers: int | None = None, nproc_per_node: int = 1,
               timeout_s: float | None = None, checkpoint_every: int = 1) -> dict[str, Any]:
    """Train (or resume) `run_id` with `config` (a TrainConfig); returns `flowerml train --json`."""
    config_json = load_config(json.dumps(config)).model_dump_json()
    arguments = child_arguments(run_id, config_json, store=store, dataset=dataset,
                                dataset_version=dataset_version, device=device, workers=workers,
                                checkpoint_every=checkpoint_every if checkpoint_every != 1
                                else None, mlflow_tag=flow_run_tag())
    return run_training_child(run_id, train_command(arguments, nproc_per_node), timeout_s)


def flow_run_tag() -> str | None:
    """The MLflow tag linking a training run to this Prefect flow run: its UI page, or its id
    where no UI URL is known (a temporary local server); None outside a flow run. `flowerml
    train` sets it only when tracking is on."""
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return None
    url = flow_run.ui_url
    if url and url.startswith(("http://", "https://")):
        return f"prefect.flow_run_url={url}"
    return f"prefect.flow_run_id={flow_run.id}"


def run_training_child(run_id: str, command: list[str], timeout_s: float | None,
                       what: str = "training run") -> dict[str, Any]:
    """Run a `flowerml train`/`distill` child to its end, its progress reported as it goes;
    returns its `--json` result."""
    reporter = ProgressReporter(run_id)
    check_outcome(run_child(command, on_line=reporter, timeout=timeout_s))
    if reporter.result is None:
        raise RuntimeError(f"{what} {run_id} ended without a result line")
    update_progress_artifact(reporter.artifact, 100.0)
    return reporter.result
