"""Runs that die at a chosen point, the interruptions the resume tests start from: in-process,
before a chosen checkpoint, or a `flowerml` child process SIGKILLed once it has checkpointed."""

from __future__ import annotations

import json
import subprocess
import sys
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


def kill_at_first_checkpoint(args: list[str], env: dict[str, str], run_dir: Path,
                             outputs: Path, timeout: float = 180) -> int:
    """Run `flowerml ARGS` (train or distill) as `python -m flowerml.cli` and SIGKILL it once
    its first checkpoint is on the store; returns the epoch it was killed at. The caller
    resumes the run (in-process: only the kill needs a child). A fresh interpreter, not a child
    forked from the test process: PyTorch refuses autograd in a child forked after the parent's
    autograd threads started, which depends on what ran before in the same pytest worker. Its
    output goes to `outputs`."""
    outputs.mkdir(parents=True, exist_ok=True)
    stderr = outputs / "killed.stderr"
    with (outputs / "killed.stdout").open("w") as out, stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "flowerml.cli", *args], env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    checkpoint = run_dir / "checkpoint.json"
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    assert checkpoint.exists(), \
        f"no checkpoint (exit {child.returncode}): {stderr.read_text()[-3000:]}"
    return json.loads(checkpoint.read_text())["epoch"]
