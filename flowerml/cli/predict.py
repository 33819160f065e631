"""`flowerml predict`: top-k flower names for image files, folders, glob patterns, list files
and s3:// keys and prefixes (the rules of `flowerml.serving.inputs`, as `flowerml score`), from a
registry model or a run.

One result per input, printed as it comes: a line `IMAGE: name p, name p, ...` (or with
`--json` one JSON object per line, `{"image", "predictions"}`). An input that cannot be
predicted (missing, not an image, truncated, too large to decode safely, a pattern matching
nothing) gets its own row (`IMAGE: error: ...`, or `{"image", "error"}`) and a line
`flowerml: error: IMAGE: ...` on stderr, and the others go on; the exit code is then 1 (with
several inputs, a last stderr line counts the failures). Exit code 2 means predicting could
not start: a bad option, an unknown model or run.
"""

from __future__ import annotations

import sys

import click

from flowerml.cli.app import (
    EXIT_REFUSED,
    Choice,
    CliError,
    cli,
    device_option,
    emit_json,
    json_option,
    store_option,
)
from flowerml.io.storage import Store
from flowerml.serving.runtimes import RUNTIMES, Scorer
from flowerml.settings import build_store, load_settings

DEFAULT_MODEL = "flowers102@production"


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--model", "model_ref", default=None,
              help=f"NAME[@ALIAS|:VERSION] from the registry (default: {DEFAULT_MODEL}).")
@click.option("--run", "run_id", default=None,
              help="Use a training run's best weights instead of a registry model.")
@store_option
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many class names to give per image, most likely first.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images decoded and classified at a time (memory grows with it).")
@click.option("--runtime", type=Choice(RUNTIMES), default="auto", show_default=True,
              help="torch, onnx or onnx-int8 (ONNX Runtime on the CPU; needs an export that "
                   "passed parity, and for int8 its own gate: flowerml export --quantize "
                   "int8); auto: on the CPU onnx-int8 when it passed, else onnx when that "
                   "passed, else torch.")
@device_option
@json_option
def predict(inputs: tuple[str, ...], model_ref: str | None, run_id: str | None,
            store: str | None, top_k: int, batch_size: int, runtime: str, device: str,
            as_json: bool) -> None:
    """Top-k flower names with probabilities for each image.

    Each INPUT is an image file, a folder or s3:// prefix (the .jpg, .jpeg, .png, .bmp, .gif,
    .webp, .tif and .tiff files under it, recursively, in sorted order; hidden names skipped),
    a glob pattern over either (expanded here when the shell has not; '**' reaches into
    subfolders), or a .txt/.json list of keys (relative to the list's folder), paths or s3://
    URIs, as flowerml score reads them. One line per image, or with --json one JSON object per
    line. Exit code 1 when any input could not be predicted (its row says why), 2 when
    predicting could not start (a bad option, an unknown model or run).
    """
    from flowerml.serving.inputs import expand_inputs
    from flowerml.serving.prediction import predict_inputs

    if model_ref and run_id:
        raise CliError("give --model or --run, not both")
    settings = load_settings(store=store)
    target = build_store(settings)
    scorer = (run_scorer(target, run_id, runtime, device) if run_id else
              version_scorer(target, model_ref or DEFAULT_MODEL, runtime, device))
    total = failed = 0
    images = expand_inputs(inputs, settings.s3_options())
    for row in predict_inputs(scorer, images, top_k=top_k, batch_size=batch_size):
        total += 1
        failed += "error" in row
        show_row(row, as_json)
    if failed:
        if total > 1:  # with one input, its note said it all
            click.echo(f"flowerml: {failed} of {total} inputs could not be predicted", err=True)
        sys.exit(EXIT_REFUSED)


def run_scorer(store: Store, run_id: str, runtime: str, device: str) -> Scorer:
    """A training run's best weights, run by PyTorch (a run has no ONNX export)."""
    from flowerml.evaluation.inference import load_trained_model
    from flowerml.serving.runtimes import scorer_from_model

    if runtime in ("onnx", "onnx-int8"):
        raise CliError(f"run '{run_id}' has no ONNX export: register it (flowerml registry "
                       "register --run ID), export the version, and predict with --model")
    return scorer_from_model(load_trained_model(store, run_id, device))


def version_scorer(store: Store, ref: str, runtime: str, device: str) -> Scorer:
    """A registry version, run by the runtime asked for (auto: ONNX Runtime when the version
    has a passing export and PyTorch would run on the CPU anyway)."""
    from flowerml.models.distributed import select_device
    from flowerml.registry.versions import Registry, resolve_ref
    from flowerml.serving.runtimes import choose_runtime, load_scorer

    chosen = resolve_ref(store, ref)
    registry = Registry(store, chosen.model)
    on_cpu = select_device(device).type == "cpu"
    if runtime in ("onnx", "onnx-int8") and not on_cpu:
        raise CliError(f"--runtime {runtime} runs on the CPU: drop --device {device}, or use "
                       "--runtime torch")
    runtime, sha256 = choose_runtime(registry, chosen.version,
                                     runtime if on_cpu or runtime != "auto" else "torch")
    return load_scorer(registry, chosen.version, runtime, sha256, device=device)


def show_row(row: dict, as_json: bool) -> None:
    if "error" in row:
        click.echo(f"flowerml: error: {row['image']}: {row['error']}", err=True)
    if as_json:
        emit_json(row)
    elif "error" in row:
        click.echo(f"{row['image']}: error: {row['error']}")
    else:
        best = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in row["predictions"])
        click.echo(f"{row['image']}: {best}")
    sys.stdout.flush()  # rows as they come, also when stdout is a pipe
