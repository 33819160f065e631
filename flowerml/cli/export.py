"""`flowerml export`: a registry version as ONNX, with its parity measured (and, with
`--quantize int8`, an int8 graph behind its own gate)."""

from __future__ import annotations

import sys

import click

from flowerml.cli.app import EXIT_REFUSED, Choice, cli, emit_json, json_option, store_option
from flowerml.settings import build_store, load_settings


@cli.command("export")
@click.argument("model_ref", metavar="NAME[@ALIAS|:VERSION]")
@click.option("--format", "export_format", type=Choice(("onnx",)), default="onnx",
              show_default=True, help="The export format.")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True,
              help="ONNX opset version.")
@click.option("--quantize", type=Choice(("none", "int8")), default="none", show_default=True,
              help="int8: also write model.int8.onnx (static QDQ quantisation, per-channel "
                   "weights, calibrated on a fixed sample of the valid split), gated on the test "
                   "split: top-1 agreement with fp32 >= 99%, test top-1 at most 0.5 points "
                   "lower. A failed int8 gate is reported, not an error: the version serves "
                   "on fp32.")
@store_option
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="DataLoader worker processes for the parity check (default: from the CPU "
                   "count).")
@json_option
def export(model_ref: str, export_format: str, opset: int, quantize: str, store: str | None,
           workers: int | None, as_json: bool) -> None:
    """Export a registry version to ONNX and measure parity against PyTorch.

    Writes model.onnx and export.json into the version (create-only: a version keeps its
    first export, and exporting again prints it). The graph takes uint8 RGB pixels, NCHW, at
    the card's image size, and normalises them itself. Parity: ONNX Runtime (on CUDA where
    onnxruntime-gpu finds a GPU, else on every CPU core) on the version's own test split must
    agree on top-1 with the logits its evaluation kept (PyTorch runs again only for a version
    evaluated before they were kept) for >= 99.9% of the images, with no logit further apart
    than 1e-3. Exits 0 when parity passes, 1 when it fails (the version then cannot be
    promoted without --force), 2 on bad input.
    """
    from flowerml.registry.export_record import ONNX_FILE
    from flowerml.registry.versions import Registry, resolve_ref
    from flowerml.serving.export import export_version
    from flowerml.serving.export_summary import export_summary, int8_line

    settings = load_settings(store=store)
    target = build_store(settings)
    chosen = resolve_ref(target, model_ref)
    registry = Registry(target, chosen.model)
    result = export_version(registry, chosen.version, cache_dir=settings.cache_dir,
                            opset=opset, workers=workers, quantize=quantize)
    summary = export_summary(result.record)
    location = target.location(registry.attachment_key(chosen.version, ONNX_FILE))
    if as_json:
        emit_json({"model": chosen.model, "version": chosen.version, "format": export_format,
                   "created": result.created, "location": location, **summary})
    else:
        verdict = "passed" if result.passed else "FAILED"
        again = "" if result.created else " (exported before)"
        click.echo(f"{chosen.label} -> {location}{again}: {summary['bytes'] / 1e6:.1f} MB, "
                   f"{summary['exporter']} exporter, opset {summary['opset']}")
        click.echo(f"parity {verdict}: top-1 agreement {summary['top1_agreement']:.4%}, max "
                   f"|logit diff| {summary['max_abs_logit_diff']:.2e} on "
                   f"{summary['parity_images']} test images "
                   f"({parity_reference(summary)}); onnx "
                   f"{summary['onnx_images_per_second']:.1f} images/s")
        if int8_line(summary):
            click.echo(int8_line(summary))
    if not result.passed:
        sys.exit(EXIT_REFUSED)


def parity_reference(summary: dict) -> str:
    """What the ONNX graph was compared with, in words."""
    if summary["parity_reference"] == "evaluation-logits":
        return f"against the evaluation's logits, on {summary['parity_provider']}"
    return f"against PyTorch run again, {summary['torch_images_per_second']:.1f} images/s"
