"""The Prefect task that exports a registered version to ONNX (and int8) and reports its
parity (and the int8 gate)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flowerml.settings import build_store, load_settings
from tasks.common import artifact_key, retry_transient


@task(name="export-onnx", task_run_name="export {model}:{version} to onnx", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def export_task(model: str, version: int, store: str | None = None,
                quantize: str = "none") -> dict[str, Any]:
    """model.onnx (and, with `quantize="int8"`, model.int8.onnx) and export.json into the
    version (idempotent: a retry reuses an intact export); the figures as a markdown artifact
    and the task's result. A failed int8 gate is printed, not raised: the version serves on
    fp32."""
    from flowerml.registry.export_record import ONNX_FILE
    from flowerml.registry.versions import Registry
    from flowerml.serving.export import export_version
    from flowerml.serving.export_summary import export_summary, int8_line

    settings = load_settings(store=store)
    target = build_store(settings)
    registry = Registry(target, model)
    result = export_version(registry, version, cache_dir=settings.cache_dir, quantize=quantize)
    summary = {**export_summary(result.record),
               "location": target.location(registry.attachment_key(version, ONNX_FILE))}
    create_markdown_artifact(export_report(model, version, summary),
                             key=artifact_key(model, "onnx-export"),
                             description=f"ONNX export of {model}:{version:06d}")
    if int8_line(summary):
        print(int8_line(summary))  # the flow logs prints: the run's log says it in one line
    return summary


def export_report(model: str, version: int, summary: dict[str, Any]) -> str:
    from flowerml.serving.export_summary import int8_line

    verdict = "passed" if summary["parity_passed"] else "FAILED (promotion needs force)"
    int8 = int8_line(summary)
    return "\n".join([
        f"# {model} version {version:06d}: ONNX export", "",
        f"- file: `{summary['location']}` ({summary['bytes'] / 1e6:.1f} MB; weights "
        f"{(summary['weights_bytes'] or 0) / 1e6:.1f} MB)",
        f"- exporter: {summary['exporter']}, opset {summary['opset']}, input "
        f"{summary['input']}",
        f"- parity {verdict}: top-1 agreement {summary['top1_agreement']:.4%}, max |logit "
        f"difference| {summary['max_abs_logit_diff']:.2e} on {summary['parity_images']} test "
        f"images, against {parity_reference(summary)}",
        *([f"- {int8}"] if int8 else []), ""])


def parity_reference(summary: dict[str, Any]) -> str:
    """What the ONNX graph was compared with, and the images/s measured."""
    onnx = (f"ONNX Runtime {summary['onnx_images_per_second']:.1f} images/s on "
            f"{summary.get('parity_provider', 'CPUExecutionProvider')}")
    if summary.get("parity_reference") == "evaluation-logits":  # absent: an older summary
        return f"the evaluation's logits (PyTorch not run again); {onnx}"
    return (f"PyTorch run again ({summary['torch_images_per_second']:.1f} images/s); "
            f"{onnx}")
