"""The training task: `flowerml train` in a child process, its progress in Prefect.

Progress lines become log lines and a progress artifact; cancellation, timeout or any error
stops the child's whole process group. A retry re-runs the same run id, which resumes from the
last checkpoint, so only crashes and timeouts are retried, never refused input.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flowerml.launch import check_outcome, run_child, train_command
from flowerml.training import iter_events
from tasks.common import retry_transient


def option_arguments(options: dict[str, Any]) -> list[str]:
    """{"batch_size": 32, "amp": False} -> ["--batch-size", "32", "--no-amp"]."""
    arguments: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            arguments += [flag, str(value)]
    return arguments


class ProgressReporter:
    """Turns the child's output into log lines, a progress artifact and the final result."""

    def __init__(self, run_id: str) -> None:
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(
            progress=0.0, key=None, description=f"Training run {run_id}")
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


@task(name="train", task_run_name="train {run_id}", retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_transient)
def train_task(run_id: str, options: dict[str, Any], store: str | None = None,
               dataset: str | None = None, dataset_version: str | None = None,
               nproc_per_node: int = 1, timeout_s: float | None = None) -> dict[str, Any]:
    """Train (or resume) `run_id`; returns `flowerml train --json`'s result."""
    arguments = ["--run-id", run_id, "--json-progress", "--json",
                 *option_arguments({"store": store, "dataset": dataset,
                                    "version": dataset_version, **options})]
    reporter = ProgressReporter(run_id)
    outcome = run_child(train_command(arguments, nproc_per_node), on_line=reporter,
                        timeout=timeout_s)
    check_outcome(outcome)
    if reporter.result is None:
        raise RuntimeError(f"training run {run_id} ended without a result line")
    update_progress_artifact(reporter.artifact, 100.0)
    return reporter.result
