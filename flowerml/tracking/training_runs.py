"""A flowerml training run as an MLflow run: experiment `flowerml/<dataset>`, run name = our run
id, found again by the tag `flowerml.run_id` when the run resumes or is evaluated.

`RunTracker.observe` is a plain event callback: give it a run's events (`fit`'s `on_event`, rank 0
only) and it logs each "epoch" event's numbers (metrics.jsonl's row: train_loss, train_top1,
valid_top1, lr, ...) as metrics at step = epoch, as they happen. What MLflow already holds is never
logged again: a run that resumes catches up the epochs its checkpoint has and MLflow lacks (killed
between the checkpoint and the log, or while the server was down) and goes on from there, so no
step is missing or doubled. The mirror never stops training: a request that fails is one warning
line, the epoch waits in `pending`, and is logged with the next epoch or at the end (`finish`);
what is still pending then is said in one warning and caught up when the run next resumes.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowerml.tracking.server import TrackingServer, failure_reason, public_params, public_value

logger = logging.getLogger(__name__)

RUN_ID_TAG = "flowerml.run_id"
STEP_KEY = "valid_top1"
"""The metric every epoch's row has: its history says which epochs MLflow holds."""
NOT_METRICS = {"event", "epoch", "epochs", "best_valid_top1"}
"""An epoch event's fields that are not the epoch's own numbers."""


def experiment_name(dataset: str) -> str:
    return f"flowerml/{dataset}"


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl row (or epoch event), by name."""
    return {name: float(value) for name, value in row.items()
            if name not in NOT_METRICS and isinstance(value, int | float)
            and not isinstance(value, bool)}


def source_commit() -> str | None:
    """The git commit of the flowerml source that runs, when it runs from a checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def find_run(server: TrackingServer, experiment: str, run_id: str) -> str | None:
    """The MLflow run id of flowerml run `run_id` in `experiment`, or None."""
    found = server.client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = server.client.search_runs([found.experiment_id],
                                     filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                                     order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


class RunTracker:
    """One training process's mirror of flowerml run `run_id` (see the module docstring)."""

    def __init__(self, server: TrackingServer, *, dataset: str, run_id: str) -> None:
        self.server = server
        self.experiment = experiment_name(dataset)
        self.run_id = run_id
        self.mlflow_run_id: str | None = None
        self.logged_through = 0  # the last epoch MLflow holds
        self.pending: list[dict[str, Any]] = []
        self.failing = False
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}

    # starting ---------------------------------------------------------------------------

    def begin(self, params: Mapping[str, Any], tags: Mapping[str, Any],
              history: Sequence[Mapping[str, Any]] = ()) -> None:
        """Open (or find again) the MLflow run and log what it lacks: `params` (the resolved
        config; a param MLflow already holds keeps its first value), `tags`, and the rows of
        `history` (the epochs the run resumes with) past the last step MLflow holds."""
        self.params, self.tags = dict(params), dict(tags)
        self.pending = [dict(row) for row in history]
        self.flush()

    def _open(self, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        client = self.server.client
        experiment_id = self.server.experiment_id(self.experiment)
        mlflow_run_id = find_run(self.server, self.experiment, self.run_id)
        held: dict[str, str] = {}
        if mlflow_run_id is None:
            mlflow_run_id = client.create_run(
                experiment_id, run_name=self.run_id, tags={RUN_ID_TAG: self.run_id}).info.run_id
        else:
            held = dict(client.get_run(mlflow_run_id).data.params)
            client.update_run(mlflow_run_id, status="RUNNING")
            steps = client.get_metric_history(mlflow_run_id, STEP_KEY)
            self.logged_through = max((metric.step for metric in steps), default=0)
        new_params = [Param(key, value) for key, value in public_params(params).items()
                      if key not in held]
        run_tags = [RunTag(key, shown) for key, value in tags.items() if value is not None
                    and (shown := public_value(key, value)) is not None]
        for start in range(0, len(new_params), 100):  # MLflow takes 100 params a request
            client.log_batch(mlflow_run_id, params=new_params[start:start + 100])
        client.log_batch(mlflow_run_id, tags=run_tags)
        self.mlflow_run_id = mlflow_run_id  # opened: params and tags are there

    # each epoch -------------------------------------------------------------------------

    def observe(self, event: Mapping[str, Any]) -> None:
        """A run's event: each "epoch" event is logged; every other one is ignored."""
        if event.get("event") == "epoch":
            self.log_epoch(event)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self.pending.append(dict(row))
        self.flush()

    def flush(self) -> bool:
        """Open the MLflow run if it is not yet, then log the pending epochs it lacks, in
        order; False (one warning per outage) when the server does not take them."""
        try:
            if self.mlflow_run_id is None:
                self._open(self.params, self.tags)
            self.pending = [row for row in self.pending
                            if int(row["epoch"]) > self.logged_through]
            if self.pending:
                self._log_rows(self.pending)
        except Exception as error:  # the mirror must not stop training
            waiting = (f"epoch {self.pending[-1]['epoch']} is not logged yet" if self.pending
                       else "the run is not mirrored yet")
            self._failed(error, f"{waiting} (it will be once the server answers)")
            return False
        if self.pending:
            self.logged_through = int(self.pending[-1]["epoch"])
        self.pending = []
        self.failing = False
        return True

    def _log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, int(row["epoch"]))
                   for row in rows for name, value in epoch_metrics(row).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics a request
            self.server.client.log_batch(self.mlflow_run_id, metrics=metrics[start:start + 1000])

    def _failed(self, error: BaseException, consequence: str) -> None:
        if not self.failing:
            logger.warning("MLflow server %s did not answer (%s): %s", self.server.shown,
                           failure_reason(error), consequence)
        self.failing = True

    # the end ----------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> bool:
        """Catch up what is pending and close the MLflow run with `status`; False (one warning
        line) when the server still does not answer."""
        caught_up = self.flush()
        if caught_up:
            try:
                self.server.client.set_terminated(self.mlflow_run_id, status=status)
                return True
            except Exception:
                caught_up = False
        logger.warning("MLflow run of %s is behind: %s; it catches up when the run resumes "
                       "(flowerml train --run-id %s)", self.run_id,
                       f"epochs from {self.pending[0]['epoch']} are not logged" if self.pending
                       else "its end was not recorded", self.run_id)
        return False


def log_evaluation(server: TrackingServer, *, dataset: str, run_id: str, split: str,
                   metrics: Mapping[str, Any], files: Sequence[Path]) -> bool:
    """Add an evaluation to flowerml run `run_id`'s MLflow run: its figures as metrics
    `<split>_<name>` (top1, top5, mean_class_accuracy...) and `files` (the report and plots) as
    artifacts under `eval/<split>/`. Never raises: False (one warning) when the server does
    not answer or the run was never tracked."""
    from mlflow.entities import Metric

    try:
        mlflow_run_id = find_run(server, experiment_name(dataset), run_id)
        if mlflow_run_id is None:
            logger.warning("run %s has no MLflow run in experiment %s: its evaluation is not "
                           "mirrored", run_id, experiment_name(dataset))
            return False
        now = int(time.time() * 1000)
        server.client.log_batch(mlflow_run_id, metrics=[
            Metric(f"{split}_{name}", float(value), now, 0) for name, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)])
        for path in files:
            server.client.log_artifact(mlflow_run_id, str(path), f"eval/{split}")
    except Exception as error:
        logger.warning("MLflow server %s did not answer (%s): the evaluation of %s is not "
                       "mirrored", server.shown, failure_reason(error), run_id)
        return False
    return True
