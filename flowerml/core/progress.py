"""Progress reporting that the library calls and each edge renders its own way.

The library calls `start(stage, total)` and `advance(n)` as work goes, and training calls
`end_epoch(report)` once per epoch with that epoch's numbers. The CLI renders a rich bar on a
terminal (each epoch's row ends with its loss and accuracy), one plain line per epoch on
stderr off a terminal (pipes, CI logs), and nothing for `--json` runs; Prefect tasks write log
lines; tests stay silent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TextIO


@dataclass(frozen=True)
class EpochReport:
    """One finished epoch: what a person watching training wants to see."""

    epoch: int
    epochs: int
    train_loss: float
    train_top1: float
    valid_top1: float
    seconds: float  # the whole epoch: training and validation

    def line(self) -> str:
        """The plain line off a terminal."""
        return (f"epoch {self.epoch}/{self.epochs}: train loss {self.train_loss:.4f}, "
                f"train acc {self.train_top1:.4f}, valid top-1 {self.valid_top1:.4f}, "
                f"{self.seconds:.1f} s")

    def brief(self) -> str:
        """What replaces the epoch's bar once it is done (its row already shows the time):
        short enough for the bar's place on an 80-column terminal."""
        return f"loss {self.train_loss:.3f} acc {self.train_top1:.3f} val {self.valid_top1:.3f}"


class Progress(Protocol):
    def start(self, stage: str, total: int | None) -> None: ...

    def advance(self, amount: int = 1) -> None: ...

    def end_epoch(self, report: EpochReport) -> None: ...


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

    def end_epoch(self, report: EpochReport) -> None:
        pass


class LineProgress(NullProgress):
    """One plain line per finished epoch on stderr, for logs and pipes where a bar would be
    a stream of control characters; stages and steps say nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def __enter__(self) -> LineProgress:
        return self

    def end_epoch(self, report: EpochReport) -> None:
        stream = self._stream or sys.stderr  # looked up late: tests and callers may swap it
        print(report.line(), file=stream, flush=True)


def bar_or_outcome_column() -> type:
    """A rich column: the bar while a stage runs, an epoch's loss and accuracy in its place
    once the epoch is done (rich is imported only where a bar is drawn)."""
    from rich.progress import BarColumn, Task
    from rich.text import Text

    class Column(BarColumn):
        def render(self, task: Task) -> object:
            outcome = task.fields.get("outcome")
            if outcome:
                return Text(outcome, no_wrap=True, overflow="ellipsis")
            return super().render(task)

    return Column


class RichProgress:
    """A rich progress bar on stderr, one task per stage; use as a context manager. An epoch's
    row ends with its loss and accuracy once the epoch is done."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("{task.description:<24}"), bar_or_outcome_column()(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
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
        self._task = self._bar.add_task(stage, total=total, outcome="")

    def advance(self, amount: int = 1) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def end_epoch(self, report: EpochReport) -> None:
        if self._task is not None:
            self._bar.update(self._task, outcome=report.brief())


def progress_for_terminal(quiet: bool, *, terminal: bool | None = None
                          ) -> RichProgress | LineProgress | NullProgress:
    """Nothing when quiet (--json, --json-progress); a bar when a person watches stderr; a line
    per epoch otherwise (pipes, CI). `terminal` overrides asking stderr whether it is a TTY."""
    if quiet:
        return NullProgress()
    if terminal is None:
        terminal = sys.stderr.isatty()
    return RichProgress() if terminal else LineProgress()
