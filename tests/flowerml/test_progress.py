"""flowerml.progress: silent when nobody watches, a rich bar on stderr when a person does."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import pytest

from flowerml.progress import NullProgress, Progress, RichProgress, progress_for_terminal


def _drive(progress: Progress) -> None:
    progress.start("survey", 10)
    progress.advance(3)
    progress.start("upload", 4)
    progress.advance(2)
    progress.start("decode", None)
    progress.advance(5)
    progress.advance()


@contextlib.contextmanager
def terminal_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """stderr replaced by the slave end of a real pseudo-terminal (set inside the test: pytest's
    capture puts its own stderr back between a fixture's setup and the test's call)."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", stream)
            yield stream
    finally:
        stream.close()
        os.close(master)


# --- NullProgress --------------------------------------------------------------------------


def test_null_progress_says_nothing(capsys: pytest.CaptureFixture[str]):
    with NullProgress() as progress:
        assert isinstance(progress, NullProgress)
        _drive(progress)
    assert capsys.readouterr() == ("", "")


# --- RichProgress --------------------------------------------------------------------------


def test_rich_progress_draws_each_stage_on_stderr_only(capsys: pytest.CaptureFixture[str]):
    with RichProgress() as progress:
        assert isinstance(progress, RichProgress)
        _drive(progress)

    out, err = capsys.readouterr()
    assert out == ""  # stdout stays clean for --json
    lines = [line.rstrip() for line in err.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["survey", "upload", "decode"]
    # Starting a stage marks the one before it complete; an unknown total shows as '?'.
    assert " 10/10 " in lines[0]
    assert " 4/4 " in lines[1]
    assert " 6/? " in lines[2] + " "


def test_rich_progress_ignores_advance_before_any_stage(capsys: pytest.CaptureFixture[str]):
    with RichProgress() as progress:
        progress.advance(5)
        progress.start("only", 2)
        progress.advance(2)
    err = capsys.readouterr().err
    assert "only" in err and "2/2" in err
    assert "5/" not in err


# --- which one a command gets --------------------------------------------------------------


def test_quiet_gets_no_bar_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch):
    with terminal_stderr(monkeypatch):
        assert sys.stderr.isatty()
        assert isinstance(progress_for_terminal(quiet=True), NullProgress)


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch):
    with terminal_stderr(monkeypatch):
        assert isinstance(progress_for_terminal(quiet=False), RichProgress)


def test_a_pipe_gets_no_bar(monkeypatch: pytest.MonkeyPatch):
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream, os.fdopen(read):
        monkeypatch.setattr(sys, "stderr", stream)
        assert not sys.stderr.isatty()
        assert isinstance(progress_for_terminal(quiet=False), NullProgress)
