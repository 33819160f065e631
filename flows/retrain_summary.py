"""What a finished `flowerml retrain` prints without --json: the verdict and version, the test
metrics, the gate's reasons, the ONNX export, and a `flowerml predict` command to try it on a
test image the model got right."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from flowerml.core.errors import FlowermlError
from flowerml.settings import Settings


def print_retrain_summary(summary: dict, model_name: str, alias: str,
                          settings: Settings) -> None:
    if summary.get("up_to_date"):
        click.echo(f"UP TO DATE: {summary['production']} (dataset {summary['dataset_version']})")
        click.echo(f"  - {summary['reasons'][0]}")
        return
    metrics = summary["metrics"]
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    click.echo(f"{verdict}: {model_name} version {summary['version']} "
               f"(run {summary['run_id']}, dataset {summary['dataset_version']})")
    click.echo(f"test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, "
               f"mean per-class {metrics['mean_class_accuracy']:.4f} on {metrics['n']} images")
    for reason in summary["reasons"]:
        click.echo(f"  - {reason}")
    if summary.get("export"):
        from flowerml.serving.export_summary import int8_line

        click.echo(f"onnx: {describe_export(summary['export'])}")
        if int8_line(summary["export"]):
            click.echo(int8_line(summary["export"]))
    image = example_image(settings, summary["run_id"], summary["dataset_version"])
    # A version that was not promoted is not behind the alias: name it by number.
    model = f"{model_name}@{alias}" if summary["promoted"] else \
        f"{model_name}:{summary['version']}"
    click.echo(f"try: flowerml predict {image} --model {model}")


def example_image(settings: Settings, run_id: str, dataset_version: str) -> Path:
    """A test image of the run's dataset version in the local cache, one the model classified
    right when its stored test predictions say so (a first try that shows the wrong flower
    looks like a broken model), else the first there is."""
    folder = settings.cache_dir / settings.dataset / dataset_version
    with contextlib.suppress(FlowermlError, OSError):
        from flowerml.evaluation.predictions import run_predictions
        from flowerml.settings import build_store

        rows = run_predictions(build_store(settings), run_id).images
        for row in rows:
            if row.correct and (folder / row.key).is_file():
                return folder / row.key
    examples = sorted(folder.glob("test/*/*.jpg"))
    return examples[0] if examples else Path("path/to/flower.jpg")


def describe_export(export: dict[str, Any]) -> str:
    verdict = "passed" if export["parity_passed"] else "FAILED"
    return (f"{export['location']} ({export['bytes'] / 1e6:.1f} MB), parity {verdict}: top-1 "
            f"agreement {export['top1_agreement']:.2%}, max |logit diff| "
            f"{export['max_abs_logit_diff']:.1e}")
