"""Runs that die at a chosen point, the interruptions the resume tests start from: in-process,
before a chosen checkpoint, or a `flowerml` child (forked) SIGKILLed once it has checkpointed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flowerml.training.runs import RunFiles
from tests.helpers.forked_commands import fork_flowerml


class DiedBeforeCheckpoint(Exception):
    """Raised in place of writing the checkpoint of the chosen epoch: the run dies after that
    epoch's best weights and metrics were written, before its checkpoint was."""


def die_before_checkpoint(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make every run in this test die just before it checkpoints `epoch`."""
    save = RunFiles.save_checkpoint

    def save_or_die(self: RunFiles, state: dict, saved_epoch: int) -> None:
        if saved_epoch == epoch:
            raise DiedBeforeCheckpoint(f"died before checkpointing epoch {epoch}")
        save(self, state, saved_epoch)

    monkeypatch.setattr(RunFiles, "save_checkpoint", save_or_die)


def kill_at_first_checkpoint(args: list[str], env: dict[str, str], run_dir: Path,
                             outputs: Path, timeout: float = 180) -> int:
    """Run `flowerml ARGS` (train or distill) in a child process and SIGKILL it once its first
    checkpoint is on the store; returns the epoch it was killed at. The caller resumes the run
    (in-process: only the kill needs a child). The child is forked from this process
    (tests/helpers/forked_commands.py: no second interpreter importing torch); its output goes
    to `outputs`."""
    child = fork_flowerml(args, env, outputs, name="killed")
    checkpoint = run_dir / "checkpoint.json"
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
    finally:
        child.kill()
    assert checkpoint.exists(), f"no checkpoint (exit {child.returncode}): {child.stderr()[-3000:]}"
    return json.loads(checkpoint.read_text())["epoch"]
