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


def kill_then_resume(command: list[str], env: dict[str, str], run_dir: Path,
                     timeout: float = 180) -> tuple[int, dict]:
    """Run a `flowerml train`/`distill` child, SIGKILL it once its first checkpoint is on the
    store, run the same command again; returns (epoch it was killed at, the resumed --json)."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoint.json"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = json.loads(checkpoint.read_text())["epoch"]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return killed_at, json.loads(resumed.stdout)
