"""What every flowerml task shares: which failures to retry, and progress as log lines."""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger

from flowerml.core.errors import RetriesExhausted, TransientError, UserError


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry outages and unknown failures; never bad input, which fails the same way again, and
    never what the layer below already retried to its limit (`RetriesExhausted`, e.g. a download
    after FLOWERML_DOWNLOAD_RETRIES), which would only multiply the attempts."""
    error = state.data if isinstance(state.data, BaseException) else None
    if isinstance(error, RetriesExhausted):
        return False
    if isinstance(error, TransientError):
        return True
    return not isinstance(error, UserError)


def artifact_key(model: str, kind: str | None = None) -> str:
    """A stable artifact key per model (Prefect keys: lowercase letters, digits, dashes), so
    the Artifacts page keeps each model's history: `flowers102-evaluation-report`."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "model"
    return f"{slug}-{kind}" if kind else slug


class LogProgress:
    """Reports each stage and every tenth of it to the task run's log."""

    def __init__(self) -> None:
        self._logger = get_run_logger()
        self._stage = ""
        self._total: int | None = None
        self._done = 0
        self._next_report = 0

    def start(self, stage: str, total: int | None) -> None:
        self._stage, self._total, self._done = stage, total, 0
        self._next_report = max(1, (total or 0) // 10)
        self._logger.info("%s: %s items", stage, total if total is not None else "?")

    def advance(self, amount: int = 1) -> None:
        self._done += amount
        if self._total and self._done >= self._next_report:
            self._logger.info("%s: %d/%d", self._stage, self._done, self._total)
            self._next_report += max(1, self._total // 10)
