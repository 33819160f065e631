"""Progress reporting that the library calls and each edge renders its own way.

The library only calls `start(stage, total)` and `advance(n)`; the CLI renders a rich bar on a
terminal, Prefect tasks write log lines, tests and `--json` runs stay silent.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Protocol


class Progress(Protocol):
    def start(self, stage: str, total: int | None) -> None: ...

    def advance(self, amount: int = 1) -> None: ...


class NullProgress:
    """Reports nothing."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass


class RichProgress:
    """A rich progress bar on stderr, one task per stage; use as a context manager."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
        self._task: int | None = None

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._bar.stop()

    def start(self, stage: str, total: int | None) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[self._task].total or 0)
        self._task = self._bar.add_task(stage, total=total)

    def advance(self, amount: int = 1) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)


def progress_for_terminal(quiet: bool) -> RichProgress | NullProgress:
    """A bar when a person watches stderr, nothing otherwise (pipes, CI, --json)."""
    if quiet or not sys.stderr.isatty():
        return NullProgress()
    return RichProgress()
