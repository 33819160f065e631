"""The CLI's MLflow mirror: `--mlflow URI`, the tracking server the settings name (checked before
any training starts), a training run's events logged to its MLflow run, and a model's registry
brought level with MLflow after it changed.

Tracking is on when `--mlflow`, FLOWERML_MLFLOW_URI or MLFLOW_TRACKING_URI names a server; an
unreachable one is one `flowerml: error:` line (exit 2) before training, or a warning with
FLOWERML_MLFLOW_REQUIRED=false. Once training runs, the mirror never stops it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import click

from flowerml.io.storage import Store
from flowerml.settings import Settings
from flowerml.tracking.server import TrackingServer, connect, failure_reason

EventFn = Callable[[dict[str, Any]], None]

mlflow_option = click.option(
    "--mlflow", "mlflow_uri", default=None, metavar="URI",
    help="Track this run on an MLflow server (default: FLOWERML_MLFLOW_URI, else "
         "MLFLOW_TRACKING_URI; none: untracked).")
mlflow_tag_option = click.option(
    "--mlflow-tag", "mlflow_tags", multiple=True, hidden=True, metavar="KEY=VALUE",
    help="An extra tag of the run's MLflow run (the retrain flow's Prefect flow-run URL).")


def tracking_server(settings: Settings) -> TrackingServer | None:
    """The settings' tracking server, checked to answer (see `flowerml.tracking.server.connect`);
    None when tracking is off."""
    return connect(settings.tracking_uri(), required=settings.mlflow_required)


def extra_tags(pairs: tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            from flowerml.cli.app import CliError

            raise CliError(f"--mlflow-tag must be KEY=VALUE, got {pair!r}")
        tags[key.strip()] = value
    return tags


def run_tags(store: Store, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A started run's params (its resolved config) and tags (dataset, manifest, device, git
    commit), from its config.json."""
    from flowerml.core.documents import plain
    from flowerml.tracking.training_runs import source_commit
    from flowerml.training.runs import RunFiles

    record = plain(RunFiles(store, run_id).record())
    commit = source_commit()
    tags = {"flowerml.dataset": record["dataset"]["name"],
            "flowerml.dataset_version": record["dataset"]["version"],
            "flowerml.manifest_sha256": record["dataset"]["manifest_sha256"],
            "flowerml.device": record["device"], "flowerml.world_size": record["world_size"],
            "flowerml.torch": record["torch"], "flowerml.git_commit": commit,
            "mlflow.source.git.commit": commit}
    if record.get("objective"):
        tags["flowerml.objective"] = record["objective"].get("kind", "distillation")
    return record["config"], tags


@contextlib.contextmanager
def tracked_events(server: TrackingServer | None, store: Store, *, dataset: str, run_id: str,
                   on_event: EventFn, tags: Mapping[str, str] | None = None) -> Iterator[EventFn]:
    """`on_event`, also mirroring the run to `server` (unchanged when None): the MLflow run
    opens at the run's "start" event (its config.json written; a resumed run's epochs up to
    the one it resumes from are caught up), each epoch is logged as it is announced, and the
    run is closed FINISHED, or FAILED/KILLED when training raised."""
    if server is None:
        yield on_event
        return
    from flowerml.tracking.training_runs import RunTracker
    from flowerml.training.runs import RunFiles

    tracker = RunTracker(server, dataset=dataset, run_id=run_id)
    resumed_from = 0
    started = False

    def track(event: dict[str, Any]) -> None:
        nonlocal resumed_from, started
        if event.get("event") == "resumed":
            resumed_from = int(event["from_epoch"])
        if event.get("event") == "start":
            params, run_tags_ = run_tags(store, run_id)
            history = [row for row in RunFiles(store, run_id).read_history()
                       if int(row["epoch"]) <= resumed_from]
            tracker.begin(params, {**run_tags_, **(tags or {})}, history)
            started = True
        tracker.observe(event)

    def observe(event: dict[str, Any]) -> None:
        try:
            track(event)
        except Exception as error:  # the mirror must not stop training
            logging.getLogger("flowerml.tracking").warning(
                "MLflow run of %s not updated: %s", run_id, failure_reason(error))
        on_event(event)

    status = "FAILED"
    try:
        yield observe
        status = "FINISHED"
    except BaseException as error:
        status = "FAILED" if isinstance(error, Exception) else "KILLED"  # Ctrl-C, a signal
        raise
    finally:
        if started:
            tracker.finish(status)


def mirror_registry(settings: Settings, store: Store, model: str) -> bool:
    """Bring MLflow's registered model `model` level with ours when tracking is on (see
    `flowerml.registry.mlflow_sync.mirror_model`: a failure is one warning line)."""
    from flowerml.registry.mlflow_sync import mirror_model

    return mirror_model(settings.tracking_uri(), store, model)


def mirror_evaluation(settings: Settings, store: Store, run_id: str, split: str,
                      summary: Mapping[str, Any]) -> bool:
    """Add an evaluation to the run's MLflow run when tracking is on (see
    `flowerml.evaluation.mlflow_report`: a failure is one warning line)."""
    from flowerml.evaluation.mlflow_report import mirror_evaluation as mirror

    return mirror(settings.tracking_uri(), store, run_id, split, summary)
