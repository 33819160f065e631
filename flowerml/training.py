"""Training: `fit(...)` turns a published split into best-on-valid weights in `runs/<run_id>/`.

The loop is plain PyTorch: mixed precision (bf16 where the GPU has it) and channels_last on
CUDA, optional torch.compile, a warm-up + cosine schedule stepped per batch, label smoothing,
early stopping on valid top-1. A checkpoint is written after every epoch, so re-running with
the same run id resumes where the last one stopped (on the CPU bit for bit: each epoch's data
order and augmentations depend on the seed and the epoch alone), and re-running it with more
epochs, nothing else changed, goes on past its end (`extend_run`); under torchrun the same code
trains with DDP, rank 0 evaluating and writing. `fit` takes explicit arguments, never the
settings; an `Objective` passed to it replaces the cross-entropy on the labels (distillation,
`flowerml.distill`) and keeps everything else: checkpoints, resume, DDP, AMP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    TensorDataset,
    get_worker_info,
)

from flowerml.distributed import (
    Placement,
    barrier,
    broadcast_flag,
    start_placement,
    stop_placement,
)
from flowerml.evaluation import Metrics, MetricsAccumulator
from flowerml.files import write_atomically
from flowerml.loaders import build_loaders, make_loader
from flowerml.manifest import PublishedDataset, resolve_dataset
from flowerml.models import FlowerModel, build_model, parameter_groups, prepare_for_strategy
from flowerml.progress import EpochReport, NullProgress, Progress
from flowerml.recipes import TrainConfig
from flowerml.runs import BEST, RunError, RunFiles, check_run_id
from flowerml.storage import S3Options, Store
from flowerml.transforms import prepare_batch
from flowerml.weights import ResolvedWeights, resolve_weights

EventFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FitResult:
    """What a training run produced; `to_json()` is `flowerml train --json`."""

    run_id: str
    checkpoint: str
    best_valid_top1: float
    best_epoch: int
    epochs_run: int
    resumed_from_epoch: int | None
    seconds: float
    images_per_second: float
    stopped_early: bool = False
    world_size: int = 1
    history: list[dict] = field(default_factory=list)
    rank: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("history", "rank")}


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


# --------------------------------------------------------------------------------------------
# Set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so weights_only loading restores them."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPUs that have it, fp16 elsewhere on CUDA, fp32 on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


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


# --------------------------------------------------------------------------------------------
# One epoch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation in one epoch: a function of nothing else."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochOrder(Sampler[int]):
    """The train order of an epoch from (seed, epoch) alone, each index tagged with its epoch.

    It yields `epoch * n + i`, which `EpochSeeded` turns back into item `i` with its RNGs seeded
    from (seed, epoch, i). Nothing depends on a stream that ran through earlier epochs (neither
    the order nor the DataLoader workers' RNGs, which persistent workers would carry across
    epochs), so a resumed run sees exactly the batches an uninterrupted one would, whatever the
    number of workers. Under torchrun the wrapped DistributedSampler orders each rank's share.
    """

    def __init__(self, length: int, seed: int, ranks: DistributedSampler | None = None) -> None:
        self.length, self.seed, self.ranks, self.epoch = length, seed, ranks, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.ranks is not None:
            self.ranks.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.ranks is not None:
            order = list(self.ranks)
        else:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.length, generator=generator).tolist()
        return iter([self.epoch * self.length + i for i in order])

    def __len__(self) -> int:
        return len(self.ranks) if self.ranks is not None else self.length


class EpochSeeded(Dataset):
    """Item `i` of `dataset` for index `epoch * n + i`, drawn with torch's, numpy's and
    Python's RNGs seeded from (seed, epoch, i). In a DataLoader worker those RNGs are the
    worker's own; in the main process (`workers=0`) torch's CPU RNG is put back afterwards, so
    the model's own random draws keep their stream (numpy's and Python's serve only the data)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: int) -> Any:
        epoch, index = divmod(tagged, len(self.dataset))
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)


def epoch_loader(loader: DataLoader, seed: int) -> DataLoader:
    """`loader` (a train loader from `build_loaders`) re-made to draw its order and its
    augmentations per epoch (`EpochOrder`, `EpochSeeded`); call `set_epoch` before each epoch."""
    ranks = loader.sampler if isinstance(loader.sampler, DistributedSampler) else None
    return make_loader(EpochSeeded(loader.dataset, seed), batch_size=loader.batch_size,
                       workers=loader.num_workers, pin_memory=loader.pin_memory,
                       persistent=loader.persistent_workers,
                       sampler=EpochOrder(len(loader.dataset), seed, ranks),
                       # worker base seeds are drawn from this, not from torch's global RNG
                       generator=torch.Generator().manual_seed(seed))


class ValidationProbe:
    """Extra numbers of one validation pass: sees each batch's inputs and the model's logits."""

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError


class Objective:
    """A training loss that needs more than (logits, labels), with what a run keeps about it.

    `fit(objective=None)` trains on cross-entropy with the labels; an objective (e.g.
    `flowerml.distill.Distillation`) replaces that step and keeps the rest of the loop. Hooks:
    - `prepare`: once the dataset is resolved and before anything is written: refuse what does
      not fit it, move to the device;
    - `record`: what config.json keeps as `objective` (None: nothing; its `description` names
      it in messages); a trained run resumes or extends only with the same record;
    - `compute`: (logits, loss) of one batch, called inside autocast: it runs the model itself;
    - `validation_probe`: extra numbers of each validation pass, added to the epoch's row.
    """

    def prepare(self, published: PublishedDataset, placement: Placement,
                config: TrainConfig) -> None:
        """Refuse a dataset or config this objective cannot train on; place its parts."""

    def record(self) -> dict[str, Any] | None:
        return None

    def compute(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def validation_probe(self) -> ValidationProbe | None:
        return None


def describe_objective(record: dict[str, Any] | None) -> str:
    """How messages name what a run was trained with, from its config.json `objective`."""
    if record is None:
        return "cross-entropy on the labels (flowerml train)"
    return str(record.get("description") or record.get("kind") or "another objective")


@dataclass
class Stepper:
    """Everything one optimisation step needs. With an `objective`, it computes the step's
    logits and loss (`criterion` is then unused)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    objective: Objective | None = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step: (mean loss, correct top-1 count) of the batch, left on the
        device so that the loop syncs once per epoch."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if self.objective is None:
                logits = self.model(inputs)
                loss = self.criterion(logits, targets)
            else:
                logits, loss = self.objective.compute(self.model, inputs, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == targets).sum()


def train_epoch(stepper: Stepper, loader: DataLoader, placement: Placement,
                channels_last: bool, progress: Progress, label: str
                ) -> tuple[float, float, int, float]:
    """(mean loss, top-1 accuracy, images, seconds) of one pass over the training loader
    (loss and accuracy of this rank's share, on the augmented images as trained)."""
    stepper.model.train()
    progress.start(label, len(loader))
    total_loss = torch.zeros((), device=placement.device)
    correct = torch.zeros((), device=placement.device, dtype=torch.long)
    images = 0
    started = time.perf_counter()
    for batch, targets in loader:
        inputs = prepare_batch(batch, placement.device, channels_last=channels_last)
        targets = targets.to(placement.device, non_blocking=True)
        loss, batch_correct = stepper.step(inputs, targets)
        total_loss += loss * len(targets)
        correct += batch_correct
        images += len(targets)
        progress.advance()
    mean_loss = float(total_loss.item()) / max(1, images)  # one sync per epoch, not per step
    top1 = int(correct.item()) / max(1, images)
    return mean_loss, top1, images * placement.world_size, time.perf_counter() - started


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                    class_names: tuple[str, ...], *, amp: bool = False,
                    channels_last: bool = False,
                    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                    ) -> Metrics:
    """Metrics of `model` over every batch of `loader`; `observe(inputs, logits)` sees each
    batch too (a `ValidationProbe`)."""
    model.eval()
    accumulator = MetricsAccumulator(len(class_names))
    autocast = autocast_for(device, amp)
    for batch, targets in loader:
        inputs = prepare_batch(batch, device, channels_last=channels_last)
        with autocast():
            logits = model(inputs)
        if observe is not None:
            observe(inputs, logits)
        accumulator.update(logits.float(), targets.to(device))
    return accumulator.result(class_names)


# --------------------------------------------------------------------------------------------
# Linear probe: features once, then many cheap epochs over them


def feature_cache_key(config: TrainConfig, published: PublishedDataset, split: str) -> str:
    identity = {"arch": config.arch, "weights": config.weights, "image_size": config.image_size,
                "manifest": published.manifest_sha256, "split": split,
                "seed": config.seed if config.weights == "none" else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(model: FlowerModel, loader: DataLoader, device: torch.device,
                     amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    autocast = autocast_for(device, amp)
    features, labels = [], []
    for batch, targets in loader:
        with autocast():
            features.append(model.features(prepare_batch(batch, device)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def cached_features(model: FlowerModel, loader: DataLoader, path: Path, device: torch.device,
                    amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of every image, computed once and kept on local disk."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["features"], saved["labels"]
    features, labels = compute_features(model, loader, device, amp)
    write_atomically(path, lambda temp: torch.save({"features": features, "labels": labels},
                                                   temp))
    return features, labels


def feature_loaders(model: FlowerModel, config: TrainConfig, store: Store,
                    published: PublishedDataset, cache_dir: Path, device: torch.device,
                    workers: int | None) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached backbone features; the backbone sees each image once, ever."""
    paths = {split: cache_dir / "features" / f"{feature_cache_key(config, published, split)}.pt"
             for split in ("train", "valid")}
    loaders = None
    if not all(path.is_file() for path in paths.values()):
        loaders = build_loaders(store, published, cache_dir, preset="none",
                                image_size=config.image_size, batch_size=config.batch_size,
                                workers=workers, seed=config.seed)
    tensors = {split: cached_features(model, getattr(loaders, split, None), paths[split],
                                      device, config.amp) for split in paths}
    features = TensorDataset(*tensors["train"])
    train = DataLoader(EpochSeeded(features, config.seed), batch_size=config.batch_size,
                       sampler=EpochOrder(len(features), config.seed),
                       generator=torch.Generator().manual_seed(config.seed))
    valid = DataLoader(TensorDataset(*tensors["valid"]), batch_size=1024)
    return train, valid


# --------------------------------------------------------------------------------------------
# The run


def check_compatible(run: RunFiles, config: TrainConfig, published: PublishedDataset,
                     objective: Objective | None = None) -> bool:
    """A run id resumes only the run it started: same configuration, same objective, same data.
    The one change a trained run accepts is more epochs; returns True when `config` asks for
    that."""
    saved = run.read_json("config.json")
    ours = objective.record() if objective is not None else None
    if saved.get("objective") != ours:
        raise RunError(f"run '{run.run_id}' was trained with "
                       f"{describe_objective(saved.get('objective'))}, not "
                       f"{describe_objective(ours)}; a trained run resumes only as itself: use "
                       "a new --run-id")
    differing = sorted(k for k, v in config.to_json().items() if saved["config"].get(k) != v)
    extends = differing == ["epochs"] and config.epochs > saved["config"]["epochs"]
    if differing and not extends:
        shown = ", ".join(f"{k} {saved['config'].get(k)!r} -> {getattr(config, k)!r}"
                          for k in differing[:4])
        raise RunError(f"run '{run.run_id}' was started with a different configuration "
                       f"({shown}); a trained run takes only a larger --epochs: use a new "
                       "--run-id")
    if saved["dataset"]["manifest_sha256"] != published.manifest_sha256:
        raise RunError(f"run '{run.run_id}' trained on {saved['dataset']['name']}@"
                       f"{saved['dataset']['version']}, not @{published.version}")
    return extends


def extend_run(run: RunFiles, config: TrainConfig, state: TrainState, stepper: Stepper,
               write: bool) -> dict[str, Any]:
    """Continue a trained run to `config.epochs` (more than it was started with) from its last
    checkpoint; returns the extension as recorded in config.json's `extensions`.

    The learning-rate schedule is the one of the new length: the epochs left follow it from
    the step the run reached (so a cosine rises to where the longer schedule would be there,
    then decays to zero at the new end). A run that stopped early is refused: more epochs
    would not train it further. Refusals come before anything is written."""
    if not run.has_checkpoint():
        raise RunError(f"run '{run.run_id}' has no checkpoint to continue from; use a new "
                       "--run-id")
    if state.stopped_early:
        raise RunError(f"run '{run.run_id}' stopped early at epoch {state.epoch} (patience "
                       f"{config.patience}); more --epochs would not train it further: use a "
                       "new --run-id")
    follow_schedule(stepper)
    record = run.read_json("config.json")
    extension = {"epochs_before": record["config"]["epochs"], "epochs": config.epochs,
                 "at_epoch": state.epoch,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if write:
        record["config"] = config.to_json()
        record["extensions"] = [*record.get("extensions", []), extension]
        run.write_json("config.json", record)
    return extension


def follow_schedule(stepper: Stepper) -> None:
    """Set each group's learning rate to the (new) schedule's value at the restored step; the
    restored optimizer holds the value of the schedule it was saved under."""
    scheduler = stepper.scheduler
    rates = [base * factor(scheduler.last_epoch)
             for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(stepper.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step


def has_trained(run: RunFiles) -> bool:
    """Whether `run` has a config.json and finished an epoch (a checkpoint, or a result): only
    such a run is pinned to its configuration and dataset version. One that stopped before
    (a crash or a kill in epoch 1) starts again with whatever it is given."""
    return run.exists() and (run.has_checkpoint() or run.store.exists(run.key("result.json")))


def start_run(run: RunFiles, record: dict) -> None:
    """config.json of a run that starts from scratch. Written only once the inputs are
    validated, the weights resolved and the model built, so that a typo cannot claim the run
    id. A run that never finished an epoch is replaced: its config.json, and the best weights
    and metrics.jsonl its first epoch may have left before it died."""
    if not run.has_checkpoint():
        base = run.key("")
        stale = [info.key for info in run.store.list(run.key(BEST.stem))
                 if BEST.matches(info.key[len(base):])]
        for key in [run.key(BEST.pointer), *stale, run.key("metrics.jsonl")]:
            run.store.delete(key)
    run.write_json("config.json", record)


def run_record(config: TrainConfig, published: PublishedDataset, placement: Placement,
               objective: Objective | None = None) -> dict:
    extra = objective.record() if objective is not None else None
    return {
        "config": config.to_json(),
        **({"objective": extra} if extra is not None else {}),
        "dataset": {"name": published.dataset, "version": published.version,
                    "manifest_sha256": published.manifest_sha256},
        "classes": list(published.class_names),
        "torch": torch.__version__,
        "device": str(placement.device),
        "world_size": placement.world_size,
    }


def checkpoint_state(model: FlowerModel, stepper: Stepper, state: TrainState,
                     linear_probe: bool) -> dict[str, Any]:
    weights = model.head.state_dict() if linear_probe else model.state_dict()
    return {
        "model": weights,
        "optimizer": stepper.optimizer.state_dict(),
        "scheduler": stepper.scheduler.state_dict(),
        "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
        "rng": rng_state(),
        "state": {k: v for k, v in asdict(state).items() if k != "best_head"},
        "best_head": state.best_head,
        "classes": model.num_classes,
    }


def restore_checkpoint(run: RunFiles, model: FlowerModel, stepper: Stepper,
                       linear_probe: bool) -> TrainState:
    saved = run.load_checkpoint()
    if saved["classes"] != model.num_classes:
        raise RunError(f"{run.checkpoint_key()}: has {saved['classes']} classes but the "
                       f"dataset has {model.num_classes}")
    (model.head if linear_probe else model).load_state_dict(saved["model"])
    stepper.optimizer.load_state_dict(saved["optimizer"])
    stepper.scheduler.load_state_dict(saved["scheduler"])
    if stepper.scaler is not None and saved["scaler"]:
        stepper.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    return TrainState(**saved["state"], best_head=saved["best_head"])


def prepare_model(config: TrainConfig, num_classes: int, placement: Placement,
                  weights: ResolvedWeights) -> FlowerModel:
    model = build_model(config.arch, num_classes, weights=weights, seed=config.seed)
    prepare_for_strategy(model, config.strategy, config.freeze_stages)
    model.to(placement.device)
    if config.channels_last and placement.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


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
        progress: Progress | None = None, objective: Objective | None = None) -> FitResult:
    """Train (or resume) run `run_id` on `dataset`, keeping the best-on-valid weights.

    `config.weights` is resolved here, once, before anything else (S3 weights with `s3`, into
    `cache_dir/weights/`), so a bad weights source fails before any data or GPU work. Nothing
    is written under `runs/<run_id>/` before the dataset is resolved and the model and loaders
    are built; a run id whose run never finished an epoch may start again with a new config,
    and a trained one takes a larger `config.epochs` (`extend_run`), nothing else.
    `objective` replaces the cross-entropy on the labels (see `Objective`).
    """
    check_run_id(run_id)
    weights = resolve_weights(config.weights, config.arch, cache_dir=Path(cache_dir), s3=s3)
    placement = start_placement(device)
    try:
        emit = on_event if on_event and placement.is_main else (lambda _event: None)
        return _fit(config, store, dataset, run_id, Path(cache_dir), version, placement,
                    workers, weights, emit, progress or NullProgress(), objective)
    finally:
        stop_placement(placement)


def _fit(config: TrainConfig, store: Store, dataset: str, run_id: str, cache_dir: Path,
         version: str | None, placement: Placement, workers: int | None,
         weights: ResolvedWeights, emit: EventFn, progress: Progress,
         objective: Objective | None) -> FitResult:
    run = RunFiles(store, run_id)
    pinned = has_trained(run)
    if version is None and pinned:
        version = run.read_json("config.json")["dataset"]["version"]
    published = resolve_dataset(store, dataset, version)
    extends = pinned and check_compatible(run, config, published, objective)
    if objective is not None:
        objective.prepare(published, placement, config)
    seed_everything(config.seed)
    model = prepare_model(config, published.num_classes, placement, weights)
    linear_probe = config.strategy == "linear-probe"
    if linear_probe:
        train_loader, valid_loader = feature_loaders(model, config, store, published, cache_dir,
                                                     placement.device, workers)
        trained: nn.Module = model.head  # trained on the cached features
    else:
        loaders = build_loaders(store, published, cache_dir, preset=config.augment,
                                image_size=config.image_size, batch_size=config.batch_size,
                                workers=workers, seed=config.seed,
                                distributed=placement.distributed)
        train_loader, valid_loader = epoch_loader(loaders.train, config.seed), loaders.valid
        trained = model
    optimizer = build_optimizer(model, config)
    stepper = Stepper(wrap_for_training(trained, config, placement), optimizer,
                      build_scheduler(optimizer, config, len(train_loader)),
                      nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                      autocast_for(placement.device, config.amp),
                      torch.amp.GradScaler("cuda") if needs_grad_scaler(
                          placement.device, config.amp) else None, objective)
    if placement.is_main and not pinned:
        start_run(run, run_record(config, published, placement, objective))
    resumed_from = None
    state = TrainState()
    if run.has_checkpoint():
        state = restore_checkpoint(run, model, stepper, linear_probe)
        resumed_from = state.epoch
        emit({"event": "resumed", "run_id": run_id, "from_epoch": state.epoch})
    if extends:
        extension = extend_run(run, config, state, stepper, write=placement.is_main)
        emit({"event": "extended", "run_id": run_id, **extension})
    emit({"event": "start", "run_id": run_id, "epochs": config.epochs, "device":
          str(placement.device), "world_size": placement.world_size,
          "dataset": f"{published.dataset}@{published.version}"})
    loop = EpochLoop(config, run, model, trained, stepper, placement, published, emit, progress,
                     linear_probe, objective)
    loop.train(state, train_loader, valid_loader)
    if placement.is_main and linear_probe and state.best_head is not None:
        save_best_linear_probe(run, model, state)
    barrier(placement)
    result = FitResult(
        run_id=run_id, checkpoint=store.location(run.weights_key()),
        best_valid_top1=state.best_top1, best_epoch=state.best_epoch, epochs_run=state.epoch,
        resumed_from_epoch=resumed_from, seconds=round(state.train_seconds, 3),
        images_per_second=round(state.train_images / max(state.train_seconds, 1e-9), 2),
        stopped_early=state.stopped_early, world_size=placement.world_size,
        history=state.history, rank=placement.rank)
    if placement.is_main:
        run.write_json("result.json", result.to_json() | {"history": state.history})
    return result


def save_best_linear_probe(run: RunFiles, model: FlowerModel, state: TrainState) -> None:
    """The full model with the best head, written once at the end of a linear probe."""
    current = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.head.load_state_dict(state.best_head)
    run.save_weights(model.state_dict(), epoch=state.best_epoch, valid_top1=state.best_top1)
    model.head.load_state_dict(current)


@dataclass
class EpochLoop:
    """The epochs of one run: train, validate, keep the best, checkpoint, stop early."""

    config: TrainConfig
    files: RunFiles
    model: FlowerModel
    trained: nn.Module
    stepper: Stepper
    placement: Placement
    published: PublishedDataset
    emit: EventFn
    progress: Progress
    linear_probe: bool
    objective: Objective | None = None

    def train(self, state: TrainState, train_loader: DataLoader, valid_loader: DataLoader) -> None:
        while state.epoch < self.config.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            train_loader.sampler.set_epoch(epoch)
            loss, top1, images, seconds = train_epoch(
                self.stepper, train_loader, self.placement,
                self.config.channels_last and not self.linear_probe, self.progress,
                f"epoch {epoch}/{self.config.epochs}")
            state.train_images += images
            state.train_seconds += seconds
            stop, report = False, None
            if self.placement.is_main:
                stop, report = self.after_epoch(state, epoch, loss, top1, images, seconds,
                                                valid_loader)
            state.epoch = epoch
            state.stopped_early = broadcast_flag(self.placement, stop)
            if self.placement.is_main:
                self.files.save_checkpoint(checkpoint_state(self.model, self.stepper, state,
                                                          self.linear_probe), epoch)
                # Announced only once the checkpoint is on the store: whoever sees "epoch N"
                # and stops the run then resumes it from epoch N, not N-1.
                report()
            barrier(self.placement)

    def after_epoch(self, state: TrainState, epoch: int, loss: float, train_top1: float,
                    images: int, seconds: float, valid_loader: DataLoader
                    ) -> tuple[bool, Callable[[], None]]:
        """Validate, record, keep the best; returns whether early stopping says stop, and the
        epoch's report, for the caller to make once the epoch's checkpoint is durable."""
        validation_started = time.perf_counter()
        evaluated = self.trained if self.linear_probe else self.model
        probe = self.objective.validation_probe() if self.objective is not None else None
        metrics = evaluate_loader(evaluated, valid_loader, self.placement.device,
                                  self.published.class_names, amp=self.config.amp,
                                  channels_last=self.config.channels_last
                                  and not self.linear_probe,
                                  observe=probe.observe if probe is not None else None)
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
            self.keep_best(state, epoch, metrics.top1)
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

    def keep_best(self, state: TrainState, epoch: int, top1: float) -> None:
        if self.linear_probe:
            state.best_head = {k: v.detach().cpu().clone()
                               for k, v in self.model.head.state_dict().items()}
        else:
            self.files.save_weights(self.model.state_dict(), epoch=epoch, valid_top1=top1)

