"""A training run's config.json: what it records when the run starts, how it pins a re-run with
the same run id (same configuration, task, dataset version), and how a trained run takes more
epochs (`extend_run`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from flowerml.core.documents import plain
from flowerml.core.recipes import TrainConfig
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing
from flowerml.models.distributed import Placement
from flowerml.training.checkpoints import TrainState
from flowerml.training.optimization import Stepper, follow_schedule
from flowerml.training.runs import (
    BEST,
    CONFIG_JSON,
    RESULT_JSON,
    RunError,
    RunExtension,
    RunFiles,
    RunRecord,
)
from flowerml.training.training_task import TrainingTask, describe_task_record


def run_record(config: TrainConfig, published: PublishedDataset, placement: Placement,
               task: TrainingTask, preprocessing: Preprocessing | None = None) -> RunRecord:
    extra = task.record()
    return RunRecord.model_validate({
        "config": config.to_json(),
        **({"objective": extra} if extra is not None else {}),
        "dataset": {"name": published.dataset, "version": published.version,
                    "manifest_sha256": published.manifest_sha256},
        **({"preprocessing": preprocessing.to_json()} if preprocessing is not None else {}),
        "classes": list(published.class_names),
        "torch": torch.__version__,
        "device": str(placement.device),
        "world_size": placement.world_size,
    })


def check_compatible(run: RunFiles, config: TrainConfig, published: PublishedDataset,
                     task: TrainingTask) -> bool:
    """A run id resumes only the run it started: same configuration, same task, same data.
    The one change a trained run accepts is more epochs; returns True when `config` asks for
    that."""
    saved = run.record()
    theirs = plain(saved.objective) if saved.objective is not None else None
    ours = task.record()
    if theirs != ours:
        raise RunError(f"run '{run.run_id}' was trained with "
                       f"{describe_task_record(theirs)}, not "
                       f"{describe_task_record(ours)}; a trained run resumes only as itself: "
                       "use a new --run-id")
    recorded = plain(saved.config)
    differing = sorted(k for k, v in config.to_json().items() if recorded.get(k) != v)
    extends = differing == ["epochs"] and config.epochs > saved.config.epochs
    if differing and not extends:
        shown = ", ".join(f"{k} {recorded.get(k)!r} -> {getattr(config, k)!r}"
                          for k in differing[:4])
        raise RunError(f"run '{run.run_id}' was started with a different configuration "
                       f"({shown}); a trained run takes only a larger --epochs: use a new "
                       "--run-id")
    if saved.dataset.manifest_sha256 != published.manifest_sha256:
        raise RunError(f"run '{run.run_id}' trained on {saved.dataset.name}@"
                       f"{saved.dataset.version}, not @{published.version}")
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
    follow_schedule(stepper.optimizer, stepper.scheduler)
    record = run.record()
    extension = RunExtension(epochs_before=record.config.epochs, epochs=config.epochs,
                             at_epoch=state.epoch,
                             time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if write:
        run.write(CONFIG_JSON, record.model_copy(update={
            "config": type(record.config).model_validate(config.to_json()),
            "extensions": [*record.extensions, extension]}))
    return plain(extension)


def has_trained(run: RunFiles) -> bool:
    """Whether `run` has a config.json and finished an epoch (a checkpoint, or a result): only
    such a run is pinned to its configuration and dataset version. One that stopped before
    (a crash or a kill in epoch 1) starts again with whatever it is given."""
    return run.exists() and (run.has_checkpoint() or run.store.exists(run.key(RESULT_JSON)))


def start_run(run: RunFiles, record: RunRecord) -> None:
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
    run.write(CONFIG_JSON, record)

