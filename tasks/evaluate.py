"""The evaluation task: a run's best weights on a split, published as Prefect artifacts."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

from flowerml.evaluation import per_class_rows
from flowerml.inference import evaluate_run
from flowerml.settings import build_store, load_settings
from tasks.common import retry_transient


@task(name="evaluate", task_run_name="evaluate {run_id} on {split}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient,
      cache_policy=INPUTS + TASK_SOURCE + RUN_ID)
def evaluate_task(run_id: str, split: str = "test", store: str | None = None,
                  dataset_version: str | None = None) -> dict[str, Any]:
    """Evaluate and publish the report (markdown) and the per-class table as artifacts."""
    settings = load_settings(store=store)
    target = build_store(settings)
    evaluation = evaluate_run(target, run_id, cache_dir=settings.cache_dir, split=split,
                              version=dataset_version)
    report = target.get_bytes(evaluation.report_key).decode()
    create_markdown_artifact(report, key=None, description=f"Evaluation of {run_id} on {split}")
    create_table_artifact(per_class_rows(evaluation.metrics), key=None,
                          description=f"Per-class accuracy of {run_id} on {split}")
    return evaluation.to_json()
