"""Runs that die at a chosen point: the interruptions the resume tests start from."""

from __future__ import annotations

import pytest

from flowerml.runs import RunFiles


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
