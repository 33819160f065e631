"""The epochs of a run: train, validate, keep the best, checkpoint, then announce, stop early.

The loop knows neither the loss (the `TrainingTask` computes it) nor what is trained and fed
(the `Trainee`: the whole model on images, or a linear probe's head on cached features). An
epoch is announced (its event, its progress line) only once its checkpoint is on the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from flowerml.core.progress import EpochReport, Progress
from flowerml.core.recipes import TrainConfig
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing
from flowerml.data.transforms import normalising, prepare_batch
from flowerml.models.distributed import Placement, barrier, broadcast_flag
from flowerml.training.checkpoints import TrainState, checkpoint_state
from flowerml.training.loader_metrics import evaluate_loader
from flowerml.training.optimization import Stepper
from flowerml.training.runs import RunFiles
from flowerml.training.trainee import Trainee

EventFn = Callable[[dict[str, Any]], None]


def train_epoch(stepper: Stepper, loader: DataLoader, placement: Placement,
                channels_last: bool, progress: Progress, label: str,
                preprocessing: Preprocessing | None = None
                ) -> tuple[float, float, int, float]:
    """(mean loss, top-1 accuracy, images, seconds) of one pass over the training loader
    (loss and accuracy of this rank's share, on the augmented images as trained), normalised
    with the model's `preprocessing`."""
    stepper.model.train()
    progress.start(label, len(loader))
    total_loss = torch.zeros((), device=placement.device)
    correct = torch.zeros((), device=placement.device, dtype=torch.long)
    images = 0
    started = time.perf_counter()
    for batch, targets in loader:
        inputs = prepare_batch(batch, placement.device, channels_last=channels_last,
                               **normalising(preprocessing))
        targets = targets.to(placement.device, non_blocking=True)
        loss, batch_correct = stepper.step(inputs, targets)
        total_loss += loss * len(targets)
        correct += batch_correct
        images += len(targets)
        progress.advance()
    mean_loss = float(total_loss.item()) / max(1, images)  # one sync per epoch, not per step
    top1 = int(correct.item()) / max(1, images)
    return mean_loss, top1, images * placement.world_size, time.perf_counter() - started


@dataclass
class EpochLoop:
    """The epochs of one run: train, validate, keep the best, checkpoint, stop early."""

    config: TrainConfig
    files: RunFiles
    trainee: Trainee
    stepper: Stepper
    placement: Placement
    published: PublishedDataset
    emit: EventFn
    progress: Progress
    preprocessing: Preprocessing | None = None  # the model's: None is today's default
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always has one

    def train(self, state: TrainState, train_loader: DataLoader, valid_loader: DataLoader) -> None:
        while state.epoch < self.config.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            train_loader.sampler.set_epoch(epoch)
            loss, top1, images, seconds = train_epoch(
                self.stepper, train_loader, self.placement, self.trainee.channels_last,
                self.progress, f"epoch {epoch}/{self.config.epochs}", self.preprocessing)
            state.train_images += images
            state.train_seconds += seconds
            stop, report = False, None
            if self.placement.is_main:
                stop, report = self.after_epoch(state, epoch, loss, top1, images, seconds,
                                                valid_loader)
            state.epoch = epoch
            state.stopped_early = broadcast_flag(self.placement, stop)
            if self.placement.is_main:
                if self.checkpoint_due(state):
                    self.files.save_checkpoint(checkpoint_state(
                        self.trainee.module, self.trainee.model.num_classes, self.stepper,
                        state), epoch)
                # Announced only once its checkpoint (if it has one) is on the store: whoever
                # sees "epoch N" and stops the run then resumes it from epoch N, not N-1.
                report()
            barrier(self.placement)

    def checkpoint_due(self, state: TrainState) -> bool:
        """Every `checkpoint_every`-th epoch, and the run's last (its end or an early stop),
        which an extension or a finished run's resume starts from."""
        return (state.epoch % self.checkpoint_every == 0 or state.epoch >= self.config.epochs
                or state.stopped_early)

    def after_epoch(self, state: TrainState, epoch: int, loss: float, train_top1: float,
                    images: int, seconds: float, valid_loader: DataLoader
                    ) -> tuple[bool, Callable[[], None]]:
        """Validate, record, keep the best; returns whether early stopping says stop, and the
        epoch's report, for the caller to make once the epoch's checkpoint is durable."""
        validation_started = time.perf_counter()
        probe = self.stepper.task.validation_probe()
        metrics = evaluate_loader(self.trainee.module, valid_loader, self.placement.device,
                                  self.published.class_names, amp=self.config.amp,
                                  channels_last=self.trainee.channels_last,
                                  observe=probe.observe if probe is not None else None,
                                  normalisation=self.preprocessing)
        row = {"epoch": epoch, "train_loss": round(loss, 5), "train_top1": round(train_top1, 5),
               "valid_loss": round(metrics.loss, 5),
               "valid_top1": round(metrics.top1, 5), "valid_top5": round(metrics.top5, 5),
               **{name: round(value, 5) for name, value in
                  (probe.result() if probe is not None else {}).items()},
               "lr": self.stepper.optimizer.param_groups[-1]["lr"],
               "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 2)}
        state.history.append(row)
        if metrics.top1 > state.best_top1:
            state.best_top1, state.best_epoch, state.bad_epochs = metrics.top1, epoch, 0
            self.trainee.keep_best(self.files, state, epoch, metrics.top1)
        else:
            state.bad_epochs += 1
        self.files.write_history(state.history)
        event = {"event": "epoch", "epochs": self.config.epochs, **row,
                 "best_valid_top1": round(state.best_top1, 5)}
        # The recorded (rounded) figures: formatting the raw ones could round the other way
        # than metrics.jsonl's (1.137349 -> "1.1373", its 1.13735 -> "1.1374").
        line = EpochReport(epoch, self.config.epochs, row["train_loss"], row["train_top1"],
                           row["valid_top1"], seconds + time.perf_counter() - validation_started)

        def report() -> None:
            self.emit(event)
            self.progress.end_epoch(line)

        return bool(self.config.patience) and state.bad_epochs >= self.config.patience, report
