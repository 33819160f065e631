"""The evaluation tasks: a run's best weights on a split, and its report published as Prefect
artifacts (and in MLflow), at once or, in the retrain flow, beside the export.

The report on the store links its plots relatively (`confusion.png`), which the Prefect UI
cannot resolve, so the artifact's copy carries them inline as data URIs: the UI shows them
with no access to the store.
"""

from __future__ import annotations

import base64
import posixpath
import re
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

from flowerml.io.storage import Store
from flowerml.settings import build_store, load_settings
from tasks.common import retry_transient

# A relative PNG link (no scheme, no leading slash), bare or in CommonMark's <...> form.
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(<?(?![a-z][a-z0-9+.-]*:|/)([^)<>]+\.png)>?\)")


def inline_images(markdown: str, read: Callable[[str], bytes]) -> str:
    """Markdown with every relative `![caption](name.png)` turned into a data URI."""
    def embed(match: re.Match) -> str:
        data = base64.b64encode(read(match.group(2))).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return IMAGE_LINK.sub(embed, markdown)


@task(name="evaluate", task_run_name="evaluate {run_id} on {split}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient,
      cache_policy=INPUTS + TASK_SOURCE + RUN_ID)
def evaluate_task(run_id: str, split: str = "test", store: str | None = None,
                  dataset_version: str | None = None, artifact_prefix: str | None = None,
                  publish: bool = True) -> dict[str, Any]:
    """Evaluate (the report, predictions and logits go to the store beside the run) and, with
    `publish`, publish the report (`publish_evaluation`). The retrain flow passes
    `publish=False` and runs `publish_evaluation_task` beside the export instead.
    With `artifact_prefix` (e.g. the model's key) the artifacts get stable keys,
    `<prefix>-evaluation-report` and `<prefix>-per-class-accuracy`, so the UI keeps their
    history."""
    from flowerml.evaluation.inference import evaluate_run
    from flowerml.training.metrics import per_class_rows

    settings = load_settings(store=store)
    target = build_store(settings)
    evaluation = evaluate_run(target, run_id, cache_dir=settings.cache_dir, split=split,
                              version=dataset_version)
    evaluated = {**evaluation.to_json(), "report_key": evaluation.report_key,
                 "summary": evaluation.metrics.summary(),
                 "per_class": per_class_rows(evaluation.metrics)}
    if publish:
        publish_evaluation(target, settings.tracking_uri(), run_id, split, evaluated,
                           artifact_prefix)
    return evaluated


@task(name="prepare-evaluation-split", task_run_name="prepare the {split} split")
def prepare_evaluation_split_task(split: str, arch: str, weights: str, image_size: int,
                                  store: str | None = None, dataset: str | None = None,
                                  dataset_version: str | None = None) -> dict[str, Any]:
    """Sync and decode `split` for the evaluation, at the idle priority, while training runs
    (`flowerml.evaluation.ahead`). It never fails the run: a problem is a warning, and the
    evaluation meets it again (and reports it) when it reads the split itself."""
    from flowerml.core.errors import FlowermlError
    from flowerml.evaluation.ahead import PreparedSplit, prepare_evaluation_split

    settings = load_settings(store=store, dataset=dataset)
    try:
        prepared = prepare_evaluation_split(
            build_store(settings), settings.dataset, dataset_version, settings.cache_dir,
            arch=arch, weights=weights, image_size=image_size, split=split)
    except FlowermlError as error:
        get_run_logger().warning("the %s split was not prepared ahead: %s", split, error)
        return PreparedSplit(split, skipped=str(error)).to_json()
    return prepared.to_json()


@task(name="publish-evaluation", task_run_name="publish the evaluation of {run_id} on {split}",
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def publish_evaluation_task(run_id: str, split: str, evaluated: dict[str, Any],
                            store: str | None = None,
                            artifact_prefix: str | None = None) -> str:
    """`evaluate_task(publish=False)`'s report as Prefect artifacts and in MLflow; returns
    the report's location."""
    settings = load_settings(store=store)
    publish_evaluation(build_store(settings), settings.tracking_uri(), run_id, split, evaluated,
                       artifact_prefix)
    return evaluated["report"]


def publish_evaluation(target: Store, tracking_uri: str | None, run_id: str, split: str,
                       evaluated: dict[str, Any], artifact_prefix: str | None) -> None:
    """The report (markdown, plots inline) and the per-class table as artifacts, and the
    figures and report added to the run's MLflow run when tracking is on."""
    from flowerml.evaluation.mlflow_report import mirror_evaluation

    folder = posixpath.dirname(evaluated["report_key"])
    report = inline_images(target.get_bytes(evaluated["report_key"]).decode(),
                           lambda name: target.get_bytes(f"{folder}/{name}"))
    create_markdown_artifact(report, key=_key(artifact_prefix, "evaluation-report"),
                             description=f"Evaluation of {run_id} on {split}")
    create_table_artifact(evaluated["per_class"], key=_key(artifact_prefix, "per-class-accuracy"),
                          description=f"Per-class accuracy of {run_id} on {split}")
    mirror_evaluation(tracking_uri, target, run_id, split, evaluated["summary"])


def _key(prefix: str | None, kind: str) -> str | None:
    return f"{prefix}-{kind}" if prefix else None
