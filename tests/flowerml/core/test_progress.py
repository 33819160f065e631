"""flowerml.core.progress: silent when quiet, a rich bar on stderr when a person watches, a plain line
per epoch on stderr when nobody does (pipes, CI logs)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import pytest

from flowerml.core.progress import (
    EpochReport,
    LineProgress,
    NullProgress,
    Progress,
    RichProgress,
    progress_for_terminal,
)
from tests.helpers.cli import invoke
from tests.helpers.stores import StoreAndCache


def _drive(progress: Progress) -> None:
    progress.start("survey", 10)
    progress.advance(3)
    progress.start("upload", 4)
    progress.advance(2)
    progress.start("decode", None)
    progress.advance(5)
    progress.advance()


def _train_two_epochs(progress: Progress) -> None:
    """What training calls: a stage per epoch, a step per batch, the epoch's numbers."""
    for epoch, (loss, acc, top1) in enumerate([(2.5, 0.25, 0.375), (1.23456, 0.5, 0.625)], 1):
        progress.start(f"epoch {epoch}/2", 3)
        progress.advance(3)
        progress.end_epoch(EpochReport(epoch, 2, loss, acc, top1, seconds=12.34 * epoch))


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
        _train_two_epochs(progress)
    assert capsys.readouterr() == ("", "")


# --- LineProgress --------------------------------------------------------------------------


def test_line_progress_prints_one_line_per_epoch_on_stderr(capsys: pytest.CaptureFixture[str]):
    with LineProgress() as progress:
        _drive(progress)  # stages and steps say nothing off a terminal
        _train_two_epochs(progress)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "epoch 1/2: train loss 2.5000, train acc 0.2500, valid top-1 0.3750, 12.3 s",
        "epoch 2/2: train loss 1.2346, train acc 0.5000, valid top-1 0.6250, 24.7 s"]


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


def test_rich_progress_shows_each_epochs_loss_and_accuracy(capsys: pytest.CaptureFixture[str]):
    with RichProgress() as progress:
        _train_two_epochs(progress)
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line.rstrip() for line in err.splitlines() if line.strip()]
    assert [line.split()[:2] for line in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]
    # A finished epoch's row shows its numbers where its bar was, then its steps and time.
    assert "loss 2.500 acc 0.250 val 0.375 3/3 " in lines[0]
    assert "loss 1.235 acc 0.500 val 0.625 3/3 " in lines[1]
    assert "━" not in err


# --- which one a command gets --------------------------------------------------------------


def test_quiet_gets_no_bar_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch):
    with terminal_stderr(monkeypatch):
        assert sys.stderr.isatty()
        assert isinstance(progress_for_terminal(quiet=True), NullProgress)


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch):
    with terminal_stderr(monkeypatch):
        assert isinstance(progress_for_terminal(quiet=False), RichProgress)


def test_a_pipe_gets_a_line_per_epoch(monkeypatch: pytest.MonkeyPatch):
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream, os.fdopen(read):
        monkeypatch.setattr(sys, "stderr", stream)
        assert not sys.stderr.isatty()
        assert isinstance(progress_for_terminal(quiet=False), LineProgress)


@pytest.mark.parametrize(("quiet", "terminal", "expected"), [
    (False, True, RichProgress), (False, False, LineProgress),
    (True, True, NullProgress), (True, False, NullProgress)])
def test_the_terminal_decision_can_be_given(quiet: bool, terminal: bool, expected: type):
    assert type(progress_for_terminal(quiet=quiet, terminal=terminal)) is expected


# --- what `flowerml train` shows -----------------------------------------------------------


def test_train_off_a_terminal_prints_a_line_per_epoch(tiny_run: StoreAndCache):
    store, cache = tiny_run
    result = invoke("train", "--recipe", "demo", "--arch", "mobilenet_v3_small", "--epochs",
                    "2", "--image-size", "40", "--device", "cpu", "--workers", "0", "--run-id",
                    "lines", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], result.stderr
    history = [json.loads(line) for line in
               store.get_bytes("runs/lines/metrics.jsonl").decode().splitlines()]
    for line, row in zip(epochs, history, strict=True):
        assert (f"train loss {row['train_loss']:.4f}, train acc {row['train_top1']:.4f}, "
                f"valid top-1 {row['valid_top1']:.4f}, ") in line
        assert 0.0 <= row["train_top1"] <= 1.0
    assert "epoch 1/2" not in result.stdout


def test_train_json_prints_no_epoch_lines(tiny_run: StoreAndCache):
    store, cache = tiny_run
    result = invoke("train", "--recipe", "demo", "--arch", "mobilenet_v3_small", "--epochs",
                    "1", "--image-size", "40", "--device", "cpu", "--workers", "0", "--run-id",
                    "quiet", "--json", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" not in result.stderr
    assert json.loads(result.stdout)["run_id"] == "quiet"
