"""Training: `fit(...)` turns a published split into best-on-valid weights in `runs/<run_id>/`.

The loop is plain PyTorch: mixed precision (bf16 where the GPU or the CPU computes it natively),
channels_last, optional torch.compile, a warm-up + cosine schedule stepped per batch, label
smoothing, early stopping on valid top-1, every split decoded and normalised the way the weights it
starts from were measured (`weights_preprocessing`, recorded in config.json). A checkpoint is
written after every epoch, so re-running with the same run id resumes where the last one stopped
(on the CPU bit for bit: each epoch's data order and augmentations depend on the seed and the epoch
alone), and re-running it with more epochs, nothing else changed, goes on past its end
(`extend_run`); under torchrun the same code trains with DDP, rank 0 evaluating and writing. `fit`
takes explicit arguments, never the settings. This module assembles a run; its parts are their own
modules: the task (what a step computes: `training_task`, `distillation_task`), the trainee (the
whole model, or a linear probe's head: `trainee`, `linear_probe`), `optimization`, `seeding`,
`precision`, `checkpoints`, `run_record` (config.json) and `epoch_loop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flowerml.core.progress import NullProgress, Progress
from flowerml.core.recipes import TrainConfig
from flowerml.data.manifest import resolve_dataset
from flowerml.data.preprocessing import Preprocessing, recorded_preprocessing
from flowerml.io.storage import S3Options, Store
from flowerml.models.backbones import FlowerModel, build_model, prepare_for_strategy
from flowerml.models.distributed import Placement, barrier, start_placement, stop_placement
from flowerml.models.precision import autocast_for, needs_grad_scaler
from flowerml.models.weights import ResolvedWeights, resolve_weights, weights_preprocessing
from flowerml.training.checkpoints import TrainState, restore_checkpoint
from flowerml.training.epoch_loop import EpochLoop, EventFn
from flowerml.training.linear_probe import LINEAR_PROBE, LinearProbe
from flowerml.training.optimization import Stepper, build_optimizer, build_scheduler
from flowerml.training.run_record import (
    check_compatible,
    extend_run,
    has_trained,
    run_record,
    start_run,
)
from flowerml.training.runs import RESULT_JSON, RunFiles, RunResult, check_run_id
from flowerml.training.seeding import seed_everything
from flowerml.training.tensorboard_log import tensorboard_events
from flowerml.training.trainee import Trainee, WholeModel
from flowerml.training.training_task import ClassificationTask, TrainingTask


class FitResult(RunResult):
    """What a training run produced: result.json's fields and this process's DDP rank;
    `to_json()` is `flowerml train --json` (no history, no rank)."""

    rank: int = Field(0, exclude=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"history"})


def prepare_model(config: TrainConfig, num_classes: int, placement: Placement,
                  weights: ResolvedWeights) -> FlowerModel:
    model = build_model(config.arch, num_classes, weights=weights, seed=config.seed)
    prepare_for_strategy(model, config.strategy, config.freeze_stages)
    model.to(placement.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def trainee_for(model: FlowerModel, config: TrainConfig) -> Trainee:
    """The linear probe trains the head on cached features; any other strategy, the model."""
    if config.strategy == LINEAR_PROBE:
        return LinearProbe(model)
    return WholeModel(model, channels_last=config.channels_last)


def wrap_for_training(model: nn.Module, config: TrainConfig, placement: Placement) -> nn.Module:
    if placement.distributed:
        ids = [placement.device.index] if placement.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        model = torch.compile(model)
    return model


def fit(config: TrainConfig, *, store: Store, dataset: str, run_id: str, cache_dir: Path,
        version: str | None = None, device: str = "auto", workers: int | None = None,
        s3: S3Options | None = None, on_event: EventFn | None = None,
        progress: Progress | None = None, task: TrainingTask | None = None,
        checkpoint_every: int = 1) -> FitResult:
    """Train (or resume) run `run_id` on `dataset`, keeping the best-on-valid weights.

    `config.weights` is resolved here, once, before anything else (S3 weights with `s3`, into
    `cache_dir/weights/`), so a bad weights source fails before any data or GPU work. Nothing
    is written under `runs/<run_id>/` before the dataset is resolved and the model and loaders
    are built; a run id whose run never finished an epoch may start again with a new config,
    and a trained one takes a larger `config.epochs` (`extend_run`), nothing else.
    `task` is what each step computes (default: `ClassificationTask`, cross-entropy on the
    labels with the config's label smoothing; see `TrainingTask`). A checkpoint is written
    after every `checkpoint_every`-th epoch and after the last: a run stopped in between
    resumes from the last one, so it does the epochs since again (bit for bit where training
    is deterministic). It is how the run is kept, not what it computes: not in `config`.
    """
    check_run_id(run_id)
    weights = resolve_weights(config.weights, config.arch, cache_dir=Path(cache_dir), s3=s3)
    placement = start_placement(device)
    try:
        emit = on_event if on_event and placement.is_main else (lambda _event: None)
        return _fit(config, store, dataset, run_id, Path(cache_dir), version, placement,
                    workers, weights, emit, progress or NullProgress(),
                    task or ClassificationTask(config.label_smoothing), checkpoint_every)
    finally:
        stop_placement(placement)


def run_preprocessing(run: RunFiles, pinned: bool, weights: ResolvedWeights,
                      config: TrainConfig, task: TrainingTask) -> Preprocessing:
    """A new run's: the task's when it decides (a distilled student sees its teacher's), else
    the weights' own; a resumed or extended run keeps what its config.json records (today's
    values when it was recorded before the field existed)."""
    if pinned:
        return recorded_preprocessing(run.record().preprocessing, config.image_size)
    return task.preprocessing(config) or weights_preprocessing(weights, config.image_size)


def _fit(config: TrainConfig, store: Store, dataset: str, run_id: str, cache_dir: Path,
         version: str | None, placement: Placement, workers: int | None,
         weights: ResolvedWeights, emit: EventFn, progress: Progress,
         task: TrainingTask, checkpoint_every: int = 1) -> FitResult:
    run = RunFiles(store, run_id)
    pinned = has_trained(run)
    if version is None and pinned:
        version = run.record().dataset.version
    published = resolve_dataset(store, dataset, version)
    extends = pinned and check_compatible(run, config, published, task)
    task.prepare(published, placement, config)
    preprocessing = run_preprocessing(run, pinned, weights, config, task)
    seed_everything(config.seed)
    trainee = trainee_for(prepare_model(config, published.num_classes, placement, weights),
                          config)
    train_loader, valid_loader = trainee.loaders(config, store, published, cache_dir,
                                                 placement, workers, preprocessing)
    optimizer = build_optimizer(trainee.model, config)
    stepper = Stepper(wrap_for_training(trainee.module, config, placement), optimizer,
                      build_scheduler(optimizer, config, len(train_loader)), task,
                      autocast_for(placement.device, config.amp),
                      torch.amp.GradScaler("cuda") if needs_grad_scaler(
                          placement.device, config.amp) else None)
    if placement.is_main and not pinned:
        start_run(run, run_record(config, published, placement, task, preprocessing))
    resumed_from = None
    state = TrainState()
    if run.has_checkpoint():
        state = restore_checkpoint(run, trainee.module, trainee.model.num_classes, stepper)
        resumed_from = state.epoch
        emit({"event": "resumed", "run_id": run_id, "from_epoch": state.epoch})
    if extends:
        extension = extend_run(run, config, state, stepper, write=placement.is_main)
        emit({"event": "extended", "run_id": run_id, **extension})
    emit({"event": "start", "run_id": run_id, "epochs": config.epochs, "device":
          str(placement.device), "world_size": placement.world_size,
          "dataset": f"{published.dataset}@{published.version}"})
    with tensorboard_events(run, state.history, emit, enabled=placement.is_main) as emit_epochs:
        EpochLoop(config, run, trainee, stepper, placement, published, emit_epochs,
                  progress, preprocessing, checkpoint_every).train(state, train_loader,
                                                                   valid_loader)
    if placement.is_main:
        trainee.finish(run, state)
    barrier(placement)
    result = FitResult(
        run_id=run_id, checkpoint=store.location(run.weights_key()),
        best_valid_top1=state.best_top1, best_epoch=state.best_epoch, epochs_run=state.epoch,
        resumed_from_epoch=resumed_from, seconds=round(state.train_seconds, 3),
        images_per_second=round(state.train_images / max(state.train_seconds, 1e-9), 2),
        stopped_early=state.stopped_early, world_size=placement.world_size,
        history=state.history, rank=placement.rank)
    if placement.is_main:
        run.write(RESULT_JSON, RunResult(**result.to_json(), history=state.history))
    return result
