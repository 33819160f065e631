"""Optimisation: the optimiser, the learning-rate schedule (warm-up, cosine, stepped per batch),
and one optimisation step (`Stepper`: the task's forward and loss, backward, the scaler)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flowerml.core.recipes import TrainConfig
from flowerml.models.backbones import FlowerModel, parameter_groups
from flowerml.training.training_task import TrainingTask


def build_optimizer(model: FlowerModel, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, strategy=config.strategy, lr=config.lr,
                              backbone_lr_factor=config.backbone_lr_factor,
                              weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.Adam(groups, lr=config.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule))


def follow_schedule(optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's learning rate to the (new) schedule's value at the restored step; the
    restored optimizer holds the value of the schedule it was saved under."""
    rates = [base * factor(scheduler.last_epoch)
             for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step


@dataclass
class Stepper:
    """Everything one optimisation step needs; the `task` computes its logits and loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    task: TrainingTask
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step: (mean loss, correct top-1 count) of the batch, left on the
        device so that the loop syncs once per epoch."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits, loss = self.task.compute(self.model, inputs, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == targets).sum()
