"""Runs that die at a chosen point, the interruptions the resume tests start from: in-process,
before a chosen checkpoint, or a `flowerml` child SIGKILLed once it has checkpointed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flowerml.training.runs import RunFiles


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


def kill_at_first_checkpoint(command: list[str], env: dict[str, str], run_dir: Path,
                             timeout: float = 180) -> int:
    """Run a `flowerml train`/`distill` child and SIGKILL it once its first checkpoint is on
    the store; returns the epoch it was killed at. The caller resumes the run (in-process: only
    the kill needs a child)."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoint.json"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return json.loads(checkpoint.read_text())["epoch"]
