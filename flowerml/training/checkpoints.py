"""Checkpoints: what a run writes after every epoch so that a re-run resumes it bit for bit.

A checkpoint holds the trained module's weights (the whole model, or a linear probe's head),
the optimiser, schedule and scaler states, every RNG state, the loop's `TrainState` and the
linear probe's best head. Its layout is the one runs were written with: keep it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from flowerml.training.optimization import Stepper
from flowerml.training.runs import RunError, RunFiles
from flowerml.training.seeding import restore_rng_state, rng_state


@dataclass
class TrainState:
    """What a checkpoint restores besides the tensors."""

    epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    best_head: dict[str, torch.Tensor] | None = None


def checkpoint_state(trained: nn.Module, classes: int, stepper: Stepper, state: TrainState
                     ) -> dict[str, Any]:
    """The checkpoint of a run whose optimiser trains `trained` (of a `classes`-way model)."""
    return {
        "model": trained.state_dict(),
        "optimizer": stepper.optimizer.state_dict(),
        "scheduler": stepper.scheduler.state_dict(),
        "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
        "rng": rng_state(),
        "state": {k: v for k, v in asdict(state).items() if k != "best_head"},
        "best_head": state.best_head,
        "classes": classes,
    }


def restore_checkpoint(run: RunFiles, trained: nn.Module, classes: int, stepper: Stepper
                       ) -> TrainState:
    """Load `run`'s checkpoint into `trained`, the stepper and the RNGs; its `TrainState`."""
    saved = run.load_checkpoint()
    if saved["classes"] != classes:
        raise RunError(f"{run.checkpoint_key()}: has {saved['classes']} classes but the "
                       f"dataset has {classes}")
    trained.load_state_dict(saved["model"])
    stepper.optimizer.load_state_dict(saved["optimizer"])
    stepper.scheduler.load_state_dict(saved["scheduler"])
    if stepper.scaler is not None and saved["scaler"]:
        stepper.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    return TrainState(**saved["state"], best_head=saved["best_head"])
