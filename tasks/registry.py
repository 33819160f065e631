"""Prefect tasks for the registry: decide, register, promote, and tell the world.

The gate decides before registering, so the card records its verdict; `promote` then moves the
alias by compare-and-swap and decides again only if production moved in between, so a
promotion that raced another one re-decides instead of overwriting it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flowerml.settings import build_store, load_settings
from tasks.common import artifact_key, retry_transient

if TYPE_CHECKING:
    from flowerml.registry.gates import Gate


# The registry and promotion modules load torch (champion re-evaluation), so they are imported
# where a task runs, not when a flow module is imported (a flow-run name must stay cheap).


def gate_of(gate: dict[str, Any]) -> Gate:
    from flowerml.registry.gates import Gate

    return Gate(threshold=gate["threshold"], tolerance=gate["tolerance"],
                class_drop=gate.get("class_drop", Gate.class_drop))


@task(name="decide-promotion", task_run_name="decide {model}@{alias}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def decide_task(model: str, alias: str, metrics: dict, dataset: str, version: str,
                gate: dict[str, Any], store: str | None = None,
                run_id: str | None = None) -> dict[str, Any]:
    """The gate's verdict on a candidate against the current production model; with `run_id`,
    the paired test on the run's stored test predictions too (`paired`: its figures)."""
    from flowerml.registry.gates import paired_figures
    from flowerml.registry.promotion import judge_candidate

    settings = load_settings(store=store)
    promote, reasons, candidate, champion = judge_candidate(
        build_store(settings), model, alias, metrics["top1"], dataset, version, gate_of(gate),
        force=gate["force"], cache_dir=settings.cache_dir, run_id=run_id)
    return {"promote": promote, "reasons": reasons, "candidate": candidate.to_json(),
            "champion": champion.to_json() if champion else None,
            "paired": paired_figures(candidate.paired, gate_of(gate))}


@task(name="check-up-to-date", task_run_name="is {model}@{alias} up to date?", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def check_up_to_date_task(model: str, alias: str, dataset: str, version: str,
                          training_config: dict[str, Any], store: str | None = None,
                          min_new_images: int | None = None) -> dict[str, Any]:
    """Whether production was trained on exactly this dataset version and config, or (with
    `min_new_images`) on all but fewer than that many of its training images (see
    `flowerml.registry.freshness`); `reason` says why the run trains, or need not."""
    from flowerml.registry.freshness import (
        PlannedTraining,
        compare_with_production,
        installed_flowerml,
    )
    from flowerml.registry.versions import Registry

    registry = Registry(build_store(load_settings(store=store)), model)
    fresh = compare_with_production(registry, alias, PlannedTraining(
        dataset, version, training_config, installed_flowerml(), min_new_images))
    if fresh.up_to_date:
        create_markdown_artifact(
            f"# Up to date\n\n{fresh.reason()}\n\nDataset `{dataset}@{version}`.\n",
            key=artifact_key(model, "up-to-date"), description=fresh.reason())
    return {**fresh.to_json(), "reason": fresh.reason()}


@task(name="register-model", task_run_name="register {run_id} as {model}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def register_task(run_id: str, model: str, metrics: dict, decision: dict[str, Any],
                  gate: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    """An immutable registry version of the run (COMMITTED last), and where to find it."""
    from flowerml.registry.mlflow_sync import mirror_model
    from flowerml.registry.release import build_card, register_run
    from flowerml.registry.versions import Registry

    settings = load_settings(store=store)
    target = build_store(settings)
    card = build_card(target, run_id, metrics, promote=decision["promote"],
                      reasons=decision["reasons"], gate={**gate, "paired": decision.get("paired")})
    registered = register_run(Registry(target, model), target, run_id, card)
    mirror_model(settings.tracking_uri(), target, model)
    uri = f"{target.uri}/registry/{model}/versions/{registered.version:06d}/"
    create_markdown_artifact(
        registry_entry(model, registered.version, uri, settings.s3_endpoint_url),
        key=artifact_key(model, "registry-entry"),
        description=f"Registered {registered.label} from run {run_id}")
    return {"version": registered.version, "label": registered.label, "uri": uri,
            "weights_sha256": registered.weights_sha256}


def registry_entry(model: str, version: int, uri: str, endpoint: str | None) -> str:
    """Where a registered version lives, as text to copy and, on AWS, a console link to open."""
    lines = [f"# {model} version {version:06d}", "", "Store location:", "", f"    {uri}", "",
             "Inspect or use it:", "",
             f"    flowerml registry show {model} --store {uri.split('/registry/')[0]}",
             f"    flowerml predict IMAGE.jpg --model {model}:{version} "
             f"--store {uri.split('/registry/')[0]}"]
    if uri.startswith("s3://") and not endpoint:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        lines += ["", f"[Open in the AWS S3 console](https://s3.console.aws.amazon.com/s3/"
                      f"buckets/{bucket}?prefix={quote(prefix)})"]
    return "\n".join(lines) + "\n"


@task(name="promote-model", task_run_name="promote {model}:{version} to {alias}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def promote_task(model: str, version: int, alias: str, candidate: dict[str, Any],
                 champion: dict[str, Any] | None, gate: dict[str, Any],
                 store: str | None = None) -> dict[str, Any]:
    """Move the alias by compare-and-swap; if production moved since the decision, decide again."""
    from flowerml.registry.gates import Scorecard
    from flowerml.registry.mlflow_sync import mirror_model
    from flowerml.registry.promotion import promote
    from flowerml.registry.versions import Registry

    settings = load_settings(store=store)
    registry = Registry(build_store(settings), model)
    promoted, reasons, state = promote(
        registry, version, scorecard=Scorecard.from_json(candidate),
        champion=Scorecard.from_json(champion) if champion else None, gate=gate_of(gate),
        alias=alias,
        force=gate["force"])
    if promoted:
        mirror_model(settings.tracking_uri(), registry.store, model)
    return {"promoted": promoted, "reasons": reasons,
            "seq": state.seq if state else None}


def announce(model: str, summary: dict[str, Any]) -> None:
    """The decision as a markdown artifact and a Prefect event automations can act on."""
    from flowerml.serving.export_summary import int8_line
    from tasks.export import parity_reference

    verdict = "promoted" if summary["promoted"] else "rejected"
    lines = [f"# {model}: {verdict}", "",
             f"- version: {summary['version']}", f"- run: {summary['run_id']}",
             f"- dataset version: {summary['dataset_version']}",
             f"- test top-1: {summary['metrics']['top1']:.4f}", "", "## Reasons", ""]
    lines += [f"- {reason}" for reason in summary["reasons"]]
    lines += paired_section(summary.get("paired"))
    export = summary.get("export")
    if export:
        parity = "passed" if export["parity_passed"] else "FAILED"
        lines += ["", "## ONNX export", "",
                  f"- `{export['location']}` ({export['bytes'] / 1e6:.1f} MB)",
                  f"- parity {parity}: top-1 agreement {export['top1_agreement']:.4%}, max "
                  f"|logit difference| {export['max_abs_logit_diff']:.2e}",
                  f"- against {parity_reference(export)}"]
        if int8_line(export):
            lines.append(f"- {int8_line(export)}")
    create_markdown_artifact("\n".join(lines), key=artifact_key(model, "promotion-decision"),
                             description=f"Promotion decision: {model}")
    emit_event(event=f"flowerml.model.{verdict}",
               resource={"prefect.resource.id": f"flowerml.model.{model}",
                         "prefect.resource.name": model},
               payload={"version": summary["version"], "metrics": summary["metrics"],
                        "reasons": summary["reasons"], "run_id": summary["run_id"],
                        "dataset_version": summary["dataset_version"], "alias": summary["alias"]})


def paired_section(paired: dict[str, Any] | None) -> list[str]:
    """The gate's paired test against production, as the decision found it (none: no
    production model to compare with)."""
    if not paired:
        return []
    lines = ["", f"## Paired test against {paired['champion']}", ""]
    if not paired["ran"]:
        return [*lines, f"Not run: {paired['reason']}. Decided on top-1 alone."]
    verdict = "significantly worse" if paired["significantly_worse"] else \
        "not significantly worse"
    lines += ["| figure | value |", "| --- | --- |",
              f"| test images | {paired['n']:,} |",
              f"| right only with the candidate | {paired['candidate_only']:,} |",
              f"| right only with production | {paired['champion_only']:,} |",
              f"| top-1 agreement | {paired['agreement']:.2%} |",
              f"| McNemar exact, one-sided p (candidate worse) | {paired['p_worse']:.4g} "
              f"({verdict} at {paired['significance']:g}) |"]
    below = paired["classes_below_floor"]
    lines += ["", f"Classes more than {paired['class_drop']:.2f} below production: "
              + (", ".join(f"{c['label']} {c['name']} ({c['champion']:.4f} -> "
                           f"{c['candidate']:.4f})" for c in below) if below else "none") + "."]
    return lines
