"""Prefect tasks for batch scoring: list the input once into shards, score one shard, finish.

Thin adapters over `flowerml.serving.scoring`, `flowerml.serving.scoring_plan` and `flowerml.serving.scoring_shards`:
each reads the settings where it runs (a Dask worker has its own FLOWERML_* and AWS_*
environment), calls one library function and returns a small JSON-able dict. Every step is
idempotent on the store (create-only parts, `_SUCCESS.json` last), so a retry, a re-run or a
shard rescheduled off a dead Dask worker never scores into a corrupt part.

When the finished run's drift (`_SUCCESS.json`'s `drift`, against the version's test baseline)
is above its threshold, the finish emits `flowerml.model.drift` (resource
`flowerml.model.<model>`; payload: version, the two PSIs, the threshold, the output), which
deploy/automations/notify-drift.yaml and retrain-on-drift.yaml act on.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flowerml.io.storage import Store
from flowerml.io.storage_open import open_store
from flowerml.settings import Settings, build_store, load_settings
from tasks.common import artifact_key, retry_transient


def output_store(uri: str, settings: Settings) -> Store:
    return open_store(uri, s3=settings.s3_options(), concurrency=settings.transfer_concurrency,
                      name="--output")


@task(name="plan-scoring", task_run_name="list {request[input]}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def plan_task(request: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    """Resolve the version and runtime, list the input into shards on the output. Returns the
    plan, and the finished run's `_SUCCESS.json` when this output is complete already."""
    from flowerml.serving.scoring import read_success
    from flowerml.serving.scoring_plan import ScoringRequest, plan_scoring

    settings = load_settings(store=store)
    target = output_store(request["output"], settings)
    plan = plan_scoring(ScoringRequest(**request), registry_store=build_store(settings),
                        output_store=target, s3=settings.s3_options())
    get_run_logger().info("%s: %d keys in %d shards -> %s (%s)", plan.input, plan.images,
                          plan.shards, target.location(plan.prefix), plan.runtime)
    return {"plan": plan.to_json(), "success": read_success(target, plan)}


@task(name="score-shard", task_run_name="score shard {shard}", retries=2,
      retry_delay_seconds=5, retry_condition_fn=retry_transient)
def score_shard_task(plan: dict[str, Any], shard: int, threads: int | None = None
                     ) -> dict[str, Any]:
    """One shard's part (skipped when it is there already)."""
    from flowerml.serving.scoring_plan import ScoringPlan
    from flowerml.serving.scoring_shards import score_shard

    scoring = ScoringPlan.from_json(plan)
    settings = load_settings(store=scoring.registry)
    result = score_shard(scoring, shard, registry_store=build_store(settings),
                         output_store=output_store(scoring.output, settings),
                         s3=settings.s3_options(), threads=threads)
    get_run_logger().info("shard %d: %d images, %d failed%s", shard, result.images,
                          result.failed, " (part was there)" if result.skipped else "")
    return result.to_json()


@task(name="finish-scoring", task_run_name="finish {plan[input_id]}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def finish_task(plan: dict[str, Any], results: list[dict[str, Any]],
                seconds: float) -> dict[str, Any]:
    """`_SUCCESS.json`, once every part is there, a report artifact, and the drift event when
    the scored images drifted."""
    from flowerml.serving.scoring import finish_scoring
    from flowerml.serving.scoring_plan import ScoringPlan
    from flowerml.serving.scoring_shards import ShardResult

    scoring = ScoringPlan.from_json(plan)
    settings = load_settings(store=scoring.registry)
    summary = finish_scoring(scoring, [ShardResult.from_json(r) for r in results],
                             output_store(scoring.output, settings), seconds,
                             registry_store=build_store(settings))
    create_markdown_artifact(scoring_report(summary), key=artifact_key(scoring.model, "scores"),
                             description=f"Scores of {scoring.input} by {scoring.label}")
    announce_drift(summary)
    return summary


def announce_drift(summary: dict[str, Any]) -> None:
    """`flowerml.model.drift` when either PSI is above the run's threshold; nothing else."""
    drift = summary.get("drift")
    if not drift or not drift["drifted"]:
        return
    get_run_logger().warning("drift: PSI top-1 probability %.3f, predicted class %.3f "
                             "(threshold %g)", drift["psi_confidence"], drift["psi_classes"],
                             drift["threshold"])
    model = summary["model"]
    emit_event(event="flowerml.model.drift",
               resource={"prefect.resource.id": f"flowerml.model.{model}",
                         "prefect.resource.name": model},
               payload={"version": summary["version"], "psi_confidence": drift["psi_confidence"],
                        "psi_classes": drift["psi_classes"], "threshold": drift["threshold"],
                        "images": drift["scored"]["images"], "input": summary["input"],
                        "output": summary["output"]})


def scoring_report(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['label']} scored {summary['input']}", "",
             f"- images: {summary['images']} ({summary['scored']} scored, "
             f"{summary['failed']} failed)",
             f"- runtime: {summary['runtime']} (sha256 {summary['sha256'][:16]}...)",
             f"- shards: {summary['shards']} of {summary['shard_size']} "
             f"({summary['shards_skipped']} done before this run)",
             f"- seconds: {summary['seconds']:.1f}", "", "Results:", "",
             f"    {summary['output']}/part-*.jsonl"]
    lines += drift_section(summary)
    if summary["failures"]:
        lines += ["", "## Failed images", "",
                  *[f"- `{f['key']}`: {f['error']}" for f in summary["failures"]]]
    return "\n".join(lines) + "\n"


def drift_section(summary: dict[str, Any]) -> list[str]:
    """The report's drift figures (or why there are none) and the review file."""
    drift = summary.get("drift")
    if not drift:
        lines = ["", "## Drift", "",
                 f"Not measured: {summary.get('drift_unavailable') or 'finished before'}"]
    else:
        verdict = "**drift found**" if drift["drifted"] else "no drift"
        lines = ["", "## Drift", "",
                 f"{verdict} against the version's test baseline (threshold "
                 f"{drift['threshold']:g}):", "",
                 f"- PSI of top-1 probability: {drift['psi_confidence']:.4f}",
                 f"- PSI of predicted class: {drift['psi_classes']:.4f}"]
    review = summary.get("review")
    if review:
        lines += ["", f"{review['images']} images below top-1 probability "
                      f"{review['below']:g} to label: `{review['file']}`"]
    return lines
