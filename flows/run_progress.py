"""What `flowerml retrain` shows on stderr while its flow runs: the flow run's name and ids as
it starts, then, from the task runs' log records, one line per training epoch (as `flowerml
train` prints it) and one per retry."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from flowerml.cli.app import one_line
from flows.preload import import_task_modules, in_background

EPOCH_LOG = "epoch %s/%s: %s"  # tasks/train.py's log line for an epoch event


class ProgressLines(logging.Handler):
    """The task-run log records a person follows, as `flowerml:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = progress_line(record)
        except Exception:  # noqa: BLE001 - a log line must never fail the run
            self.handleError(record)
            return
        if line:
            click.echo(f"flowerml: {line}", err=True)


def show_progress_lines() -> None:
    logging.getLogger("prefect.task_runs").addHandler(ProgressLines())


def progress_line(record: logging.LogRecord) -> str | None:
    """An epoch line (tasks/train.py logs `epoch %s/%s: <event JSON>`) or a retry notice."""
    message = record.getMessage()
    if record.msg == EPOCH_LOG and isinstance(record.args, tuple) and len(record.args) == 3:
        from flowerml.core.progress import EpochReport

        try:
            event = json.loads(record.args[2])
            return EpochReport(int(record.args[0]), int(record.args[1]), event["train_loss"],
                               event["train_top1"], event["valid_top1"],
                               event["seconds"]).line()
        except (ValueError, KeyError, TypeError):  # another event shape: show it as it is
            return message
    if message.startswith("Task run failed with") and " - Retry " in message:
        return f"{getattr(record, 'task_run_name', 'task')}: {one_line(message)}"
    return None


def announce_run(model_name: str) -> Any:
    """A flow hook printing the run's name and ids as it starts: what to look up in the UI,
    and the training run that holds its checkpoints, known before any work. It also starts
    importing what the later tasks need (`import_task_modules`): not sooner, where it would
    compete for the CPU with Prefect's temporary server starting."""
    from flows.retrain import training_run_id  # Prefect: imported once the options parse

    def flow_run_started(_flow: Any, flow_run: Any, _state: Any) -> None:
        click.echo(f"flowerml: flow run '{flow_run.name}' ({flow_run.id}); training run "
                   f"{training_run_id(model_name, flow_run.id)}", err=True)
        in_background("flowerml-imports", import_task_modules)

    return flow_run_started
