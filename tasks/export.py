"""The Prefect task that exports a registered version to ONNX and reports its parity."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flowerml.settings import build_store, load_settings
from tasks.common import artifact_key, retry_transient


@task(name="export-onnx", task_run_name="export {model}:{version} to onnx", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def export_task(model: str, version: int, store: str | None = None) -> dict[str, Any]:
    """model.onnx and export.json into the version (idempotent: a retry reuses an intact
    export); the figures as a markdown artifact and the task's result."""
    from flowerml.registry.export_record import ONNX_FILE
    from flowerml.registry.versions import Registry
    from flowerml.serving.export import export_summary, export_version

    settings = load_settings(store=store)
    target = build_store(settings)
    registry = Registry(target, model)
    result = export_version(registry, version, cache_dir=settings.cache_dir)
    summary = {**export_summary(result.record),
               "location": target.location(registry.attachment_key(version, ONNX_FILE))}
    create_markdown_artifact(export_report(model, version, summary),
                             key=artifact_key(model, "onnx-export"),
                             description=f"ONNX export of {model}:{version:06d}")
    return summary


def export_report(model: str, version: int, summary: dict[str, Any]) -> str:
    verdict = "passed" if summary["parity_passed"] else "FAILED (promotion needs force)"
    return "\n".join([
        f"# {model} version {version:06d}: ONNX export", "",
        f"- file: `{summary['location']}` ({summary['bytes'] / 1e6:.1f} MB; weights "
        f"{(summary['weights_bytes'] or 0) / 1e6:.1f} MB)",
        f"- exporter: {summary['exporter']}, opset {summary['opset']}, input "
        f"{summary['input']}",
        f"- parity {verdict}: top-1 agreement {summary['top1_agreement']:.4%}, max |logit "
        f"difference| {summary['max_abs_logit_diff']:.2e} on {summary['parity_images']} test "
        "images",
        f"- CPU images/s: PyTorch eager {summary['torch_images_per_second']:.1f}, ONNX Runtime "
        f"{summary['onnx_images_per_second']:.1f}", ""])
