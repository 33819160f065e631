"""`flowerml runs list|show|delete`: the training runs on a store."""

from __future__ import annotations

import shlex

import click

from flowerml.cli.app import cli, emit_json, emit_listing, json_option, store_option
from flowerml.settings import build_store, load_settings


@cli.group()
def runs() -> None:
    """Training runs on the store: list them, show one, delete one."""


def open_store(store: str | None):
    return build_store(load_settings(store=store))


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def progress_text(run) -> str:
    if run.epochs is None:
        return "-"
    return f"{run.epochs_done}/{run.epochs} epochs"


@runs.command("list")
@store_option
@json_option
def runs_list(store: str | None, as_json: bool) -> None:
    """Every run: status, dataset version, architecture, epochs, best valid and test top-1,
    and the registry versions made from it.

    A store with no runs prints nothing on stdout (`[]` with --json) and exits 0.
    """
    from flowerml.registry.inventory import list_runs

    target = open_store(store)
    found = list_runs(target)
    if emit_listing(found, as_json=as_json, empty=f"no runs on {target.uri}"):
        return
    for run in found:
        dataset = f"{run.dataset}@{run.dataset_version}" if run.dataset else "-"
        registered = f"  registered {', '.join(run.registered)}" if run.registered else ""
        problem = f"  ({run.problem})" if run.problem else ""
        click.echo(f"{run.run_id}  {run.status}  {dataset}  {run.arch or '-'}  "
                   f"{progress_text(run)}  valid top-1 {score(run.best_valid_top1)}  "
                   f"test top-1 {score(run.test_top1)}{registered}{problem}")


@runs.command("show")
@click.argument("run_id", metavar="RUN_ID")
@store_option
@json_option
def runs_show(run_id: str, store: str | None, as_json: bool) -> None:
    """One run: where it is, its configuration and dataset, each epoch's metrics, its
    evaluations, extensions and registry versions. An unknown run is an error (exit 2)."""
    from flowerml.registry.inventory import describe_run

    details = describe_run(open_store(store), run_id)
    if as_json:
        emit_json(details.to_json())
        return
    for line in describe_lines(details):
        click.echo(line)


def describe_lines(run) -> list[str]:
    dataset = f"{run.dataset}@{run.dataset_version}" if run.dataset else "-"
    lines = [f"run {run.run_id}: {run.status}, {progress_text(run)}"
             + (" (stopped early)" if run.stopped_early else ""),
             f"  location: {run.location}",
             *(tensorboard_lines(run.tensorboard) if run.tensorboard else []),
             f"  dataset: {dataset}",
             f"  best valid top-1: {score(run.best_valid_top1)}"
             + (f" (epoch {run.best_epoch})" if run.best_epoch else "")]
    if run.problem:
        lines.append(f"  problem: {run.problem}")
    if run.config:
        lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in run.config.items()))
    for extension in run.extensions:
        lines.append(f"  extended: {extension['epochs_before']} -> {extension['epochs']} epochs "
                     f"at epoch {extension['at_epoch']} ({extension.get('time', '?')})")
    for row in run.history:
        lines.append(f"  epoch {row.get('epoch')}: train loss {row.get('train_loss')}, valid "
                     f"loss {row.get('valid_loss')}, valid top-1 {row.get('valid_top1')}, "
                     f"lr {row.get('lr')}")
    for evaluation in run.evaluations:
        metrics = evaluation.metrics
        lines.append(f"  {evaluation.split}: top-1 {score(metrics.get('top1'))}, top-5 "
                     f"{score(metrics.get('top5'))} on {metrics.get('n')} images of "
                     f"{evaluation.dataset or '?'}; report {evaluation.report}")
    if run.registered:
        lines.append(f"  registered: {', '.join(run.registered)}")
    return lines


def tensorboard_lines(logdir: str) -> list[str]:
    """The command that shows the run's curves and confusion matrices. TensorBoard reads an
    s3:// logdir itself (through boto3), with the standard AWS chain but none of flowerml's
    own FLOWERML_S3_* overrides, hence the note."""
    lines = [f"  tensorboard: tensorboard --logdir {shlex.quote(logdir)}"]
    if logdir.startswith("s3://"):
        lines.append("    (TensorBoard reads S3 with the standard AWS credentials; for an "
                     "S3-compatible server set AWS_ENDPOINT_URL_S3 to its URL first)")
    return lines


@runs.command("delete")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--force", is_flag=True,
              help="Delete it even if registry versions came from it (they keep their own "
                   "weights and card).")
@store_option
@json_option
def runs_delete(run_id: str, force: bool, store: str | None, as_json: bool) -> None:
    """Delete every file of a run (checkpoints, weights, metrics, evaluations).

    A run that a registry version came from is refused (exit 2) unless --force. --json
    prints {run_id, location, files, registered, forced}.
    """
    from flowerml.registry.inventory import delete_run

    deleted = delete_run(open_store(store), run_id, force=force)
    if as_json:
        emit_json(deleted.to_json())
        return
    click.echo(f"deleted run {deleted.run_id}: {deleted.files} files under {deleted.location}")
    if deleted.registered:
        click.echo(f"  registry versions {', '.join(deleted.registered)} keep their weights; "
                   "their lineage names a run that is gone")
