"""What a retrain run shows on stderr (flows/run_progress.py): Prefect's task-run log records
as one `flowerml:` line per epoch and per retry."""

from __future__ import annotations

import json
import logging

from flows.run_progress import EPOCH_LOG, progress_line


def test_retries_are_shown_in_one_line() -> None:
    """Prefect's retry notice, whole on one line."""
    record = logging.LogRecord(
        "prefect.task_runs", logging.INFO, __file__, 1,
        "Task run failed with %s: %r - Retry %s/%s will start %s", (
            "exception", RuntimeError("training exited with code -9:\nkilled"), 1, 2,
            "30 second(s) from now"), None)
    record.task_run_name = "train flowers102-1"
    assert progress_line(record) == (
        "train flowers102-1: Task run failed with exception: RuntimeError('training exited "
        "with code -9:\\nkilled') - Retry 1/2 will start 30 second(s) from now")


def epoch_record(event: str) -> logging.LogRecord:
    """tasks/train.py's log record for an epoch event."""
    return logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, EPOCH_LOG,
                             (2, 5, event), None)


def test_an_epoch_is_shown_as_flowerml_train_prints_it() -> None:
    event = json.dumps({"epoch": 2, "epochs": 5, "train_loss": 1.23456, "train_top1": 0.5,
                        "valid_top1": 0.625, "seconds": 12.34})
    assert progress_line(epoch_record(event)) == (
        "epoch 2/5: train loss 1.2346, train acc 0.5000, valid top-1 0.6250, 12.3 s")


def test_an_epoch_event_of_another_shape_is_shown_as_logged() -> None:
    assert progress_line(epoch_record('{"epoch": 2}')) == 'epoch 2/5: {"epoch": 2}'


def test_other_task_run_records_are_not_shown() -> None:
    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1,
                               "Finished in state %s", ("Completed()",), None)
    assert progress_line(record) is None
