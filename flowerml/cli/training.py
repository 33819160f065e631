"""`flowerml train` and `flowerml evaluate`: fine-tune a run, measure it on a split."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import click
from click.core import ParameterSource

from flowerml.cli.app import (
    Choice,
    CliError,
    cli,
    dataset_option,
    device_option,
    emit_json,
    json_option,
    raise_if_stop_was_lost,
    store_option,
    training_options,
)
from flowerml.cli.tracking import (
    extra_tags,
    mirror_evaluation,
    mlflow_option,
    mlflow_tag_option,
    tracked_events,
    tracking_server,
)
from flowerml.core.recipes import RECIPE_NAMES
from flowerml.io.storage import Store
from flowerml.settings import build_store, load_settings

train_dataset_version_option = click.option(
    "--dataset-version", default=None,
    help="Dataset version to train on (default: the dataset's CURRENT).")
workers_option = click.option("--workers", type=click.IntRange(0, 64), default=None,
                              help="DataLoader worker processes (default: from the CPU count).")


def launched_options(command: Callable) -> Callable:
    """What `flowerml retrain`'s launcher passes a training child: when to stop, and epoch
    events as JSON lines."""
    command = click.option("--json-progress", is_flag=True, help="One JSON line per epoch on "
                           "stdout (human text then goes to stderr).")(command)
    return click.option("--exit-with-parent", type=int, default=None, hidden=True,
                        help="Stop when this process id is gone (set by the launcher).")(command)


def run_source_options(command: Callable) -> Callable:
    """Where a training run's images come from: the store, the dataset and its version."""
    for decorator in (train_dataset_version_option, dataset_option, store_option):
        command = decorator(command)
    return command


def run_reporting_options(command: Callable) -> Callable:
    """How a training run reports: MLflow, the launcher's progress lines, --json."""
    for decorator in (json_option, launched_options, mlflow_tag_option, mlflow_option):
        command = decorator(command)
    return command


class LiveRun(NamedTuple):
    """What a training command runs under: its id, its progress display, its event sink."""
    run_id: str
    progress: Any
    on_event: Callable[[dict], None]


@contextmanager
def live_run(settings: Any, target: Store, run_id: str | None,
             announce: Callable[[dict], None], tags: dict[str, str],
             quiet: bool) -> Iterator[LiveRun]:
    """A training run's surroundings: an unreachable tracking server is refused here, before
    any training; a new run gets a time-stamped id; events go to the terminal and MLflow."""
    from flowerml.core.progress import progress_for_terminal

    server = tracking_server(settings)
    run_id = run_id or new_run_id()
    with progress_for_terminal(quiet=quiet) as progress, tracked_events(
            server, target, dataset=settings.dataset, run_id=run_id,
            on_event=announce, tags=tags) as on_event:
        yield LiveRun(run_id, progress, on_event)


def recipe_was_typed() -> bool:
    """Whether --recipe was given: a resumed run otherwise keeps its own config."""
    return click.get_current_context().get_parameter_source("recipe") \
        is not ParameterSource.DEFAULT


def new_run_id() -> str:
    import secrets
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def announce_run(json_progress: bool) -> Callable[[dict], None]:
    """What the run's events print: its id first (on stderr, once the inputs checked out and
    the run exists), so that a Ctrl-C or a crash still says which run to resume; with
    --json-progress every event as a JSON line on stdout."""
    def on_event(event: dict) -> None:
        raise_if_stop_was_lost()
        if event.get("event") == "start":
            run_id = event["run_id"]
            click.echo(f"flowerml: run {run_id} (resume it with: flowerml train --run-id "
                       f"{run_id})", err=True)
        if json_progress:
            emit_json(event)
    return on_event


def saved_config(store: Store, run_id: str) -> dict[str, Any] | None:
    """The training config a run was started with, or None for a new run id."""
    from flowerml.core.documents import plain
    from flowerml.training.runs import RunFiles, check_run_id

    record = RunFiles(store, check_run_id(run_id, "--run-id")).optional_record()
    return plain(record.config) if record is not None else None


def say(text: str, machine_output: bool) -> None:
    """Human text: stdout normally, stderr when stdout carries JSON (--json, --json-progress)."""
    click.echo(text, err=machine_output)


@cli.command()
@run_source_options
@click.option("--recipe", type=Choice(RECIPE_NAMES), default="default", show_default=True,
              help="A named set of the options below; explicit options override it.")
@training_options
@click.option("--config", "config_json", default=None,
              help="A whole training config as JSON, instead of --recipe and the options above.")
@device_option
@workers_option
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Write the resumable checkpoint after every N-th epoch (and the last); a "
                   "stopped run redoes the epochs since its last one.")
@click.option("--run-id", default=None,
              help="Resume this run with its own config (a larger --epochs extends it), or "
                   "name a new one (default: a new time-stamped id).")
@run_reporting_options
def train(store: str | None, dataset: str | None, dataset_version: str | None, recipe: str,
          config_json: str | None, device: str, workers: int | None, checkpoint_every: int,
          run_id: str | None,
          mlflow_uri: str | None, mlflow_tags: tuple[str, ...], exit_with_parent: int | None,
          json_progress: bool, as_json: bool, **options: Any) -> None:
    """Fine-tune a model on the published train split, selecting on valid."""
    from flowerml.core.launch import exit_with_parent_process
    from flowerml.core.recipes import build_config, load_config
    from flowerml.training.fit import fit

    if exit_with_parent is not None:
        exit_with_parent_process(exit_with_parent)
    settings = load_settings(store=store, dataset=dataset, mlflow_uri=mlflow_uri)
    if config_json is not None and any(v is not None for v in options.values()):
        raise CliError("give --config or training options, not both")
    tags = extra_tags(mlflow_tags)
    target = build_store(settings)
    target.check_writable()  # a read-only key is refused now, not at the first checkpoint
    saved = None if config_json or recipe_was_typed() or not run_id else saved_config(target, run_id)
    if saved is not None:  # resuming or extending: the run's own config, with what was typed
        config = load_config(json.dumps({**saved, **{k: v for k, v in options.items()
                                                     if v is not None}}))
    else:
        config = load_config(config_json) if config_json else build_config(recipe, **options)
    with live_run(settings, target, run_id, announce_run(json_progress), tags,
                  quiet=as_json or json_progress) as run:
        result = fit(config, store=target, dataset=settings.dataset,
                     run_id=run.run_id, cache_dir=settings.cache_dir,
                     version=dataset_version, device=device, workers=workers,
                     s3=settings.s3_options(), on_event=run.on_event, progress=run.progress,
                     checkpoint_every=checkpoint_every)
    if result.rank != 0:
        return  # under torchrun, rank 0 speaks for the run
    if as_json:
        emit_json(result.to_json())
        return
    resumed = (f", resumed from epoch {result.resumed_from_epoch}"
               if result.resumed_from_epoch is not None else "")
    say(f"run {result.run_id}: best valid top-1 {result.best_valid_top1:.4f} "
        f"(epoch {result.best_epoch} of {result.epochs_run}{resumed}); "
        f"{result.images_per_second:.1f} images/s; weights {result.checkpoint}", json_progress)
    say(f"next: flowerml evaluate --run {result.run_id}", json_progress)


@cli.command()
@click.option("--run", "run_id", required=True, help="The training run to evaluate.")
@store_option
@click.option("--split", type=Choice(("train", "valid", "test")), default="test",
              show_default=True, help="Which published split to evaluate on.")
@click.option("--dataset-version", default=None,
              help="Dataset version (default: the one the run trained on).")
@device_option
@workers_option
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None,
              help="Images per forward pass (default: 256 on CUDA, 64 on the CPU).")
@json_option
def evaluate(run_id: str, store: str | None, split: str, dataset_version: str | None,
             device: str, workers: int | None, batch_size: int | None, as_json: bool) -> None:
    """Evaluate a run's best weights on a split; writes the report next to the run.

    A student trained with `flowerml distill` also gets `agreement`: its top-1 agreement with
    its teacher on the split (and the teacher's top-1 there), in eval/<split>/agreement.json."""
    from flowerml.distillation.agreement import measure_agreement
    from flowerml.distillation.distillation_task import distillation_record
    from flowerml.evaluation.inference import evaluate_run

    settings = load_settings(store=store)
    target = build_store(settings)
    outcome = evaluate_run(target, run_id, cache_dir=settings.cache_dir,
                           split=split, version=dataset_version, device=device, workers=workers,
                           batch_size=batch_size)
    agreement = measure_agreement(
        target, run_id, cache_dir=settings.cache_dir, split=split, version=dataset_version,
        device=device, workers=workers, batch_size=batch_size) \
        if distillation_record(target, run_id) else None
    mirror_evaluation(settings, target, run_id, split, outcome.metrics.summary())
    if as_json:
        emit_json(outcome.to_json() | ({"agreement": agreement.agreement,
                                        "teacher": agreement.teacher,
                                        "teacher_top1": agreement.teacher_top1}
                                       if agreement else {}))
        return
    summary = outcome.metrics.summary()
    click.echo(f"{split}: top-1 {summary['top1']:.4f}, top-5 {summary['top5']:.4f}, "
               f"mean per-class {summary['mean_class_accuracy']:.4f}, loss "
               f"{summary['loss']:.4f} on {summary['n']} images; report {outcome.report_location}")
    if agreement:
        click.echo(f"{split}: agreement with teacher {agreement.teacher['label']} "
                   f"{agreement.agreement:.4f} (teacher top-1 {agreement.teacher_top1:.4f})")
