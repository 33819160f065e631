"""The `flowerml` console script: the library's commands plus `flowerml retrain`.

`retrain` runs the retrain flow in this process, so "flows -> tasks -> flowerml" holds in the
code: `flowerml/cli/` never imports a flow, and this module adds the command that does.
SIGTERM (systemd, `timeout`, Kubernetes) and Ctrl-C stop the flow and the training child's
whole process group, and the command exits within seconds with one line saying so.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from flowerml.cli import (
    DEVICES,
    Choice,
    CliError,
    alias_option,
    cli,
    dataset_option,
    emit_json,
    json_option,
    store_option,
    training_options,
)
from flowerml.promotion import Gate
from flowerml.recipes import RECIPE_NAMES
from flowerml.settings import Settings, load_settings

DEMO_SPEC = {"classes": 10, "per_class": 30, "image_size": 96, "seed": 0}
DEMO_THRESHOLD = 0.7


def demo_source(cache_dir: Path) -> Path:
    """The demo's synthetic archive, written once into the cache."""
    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    folder = cache_dir / "demo-source"
    if not (folder / "setid.mat").is_file():
        write_synthetic_archive(folder, SyntheticSpec(**DEMO_SPEC), force=True)
    return folder


def retrain_params(preset: str | None, source: str | None, store: str | None,
                   dataset: str | None, gate: dict[str, Any], model_name: str, alias: str,
                   cache_dir: Path, training: dict[str, Any]) -> dict[str, Any]:
    """The flow's parameters from the command line, the demo preset filling the gaps."""
    training = {k: v for k, v in training.items() if v is not None}
    gate = {k: v for k, v in gate.items() if v is not None}
    if preset == "demo":
        source = source or str(demo_source(cache_dir))
        training = {"recipe": "demo", **training}
        gate = {"threshold": DEMO_THRESHOLD, **gate}
    params: dict[str, Any] = {"source": source or "official", "training": training,
                              "gate": gate, "model_name": model_name, "alias": alias}
    if store:
        params["store"] = store
    if dataset:
        params["dataset"] = dataset
    return params


class Stopped(Exception):
    """SIGTERM or SIGINT reached `flowerml retrain`."""


def stop_on_signals() -> None:
    """Turn SIGTERM/SIGINT into an exception: it unwinds the flow, whose training task stops
    its child's process group on the way out."""
    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


@cli.command()
@click.option("--preset", type=Choice(("demo",)), default=None,
              help="demo: a synthetic archive, a small CPU model, a 0.7 gate.")
@click.option("--source", default=None, help="official (default), a folder, URL or s3:// prefix.")
@store_option
@dataset_option
@click.option("--recipe", type=Choice(RECIPE_NAMES), default=None,
              help="A named training config; the options below override it.")
@training_options
@click.option("--device", type=Choice(DEVICES), default=None, help="Default: auto.")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="DataLoader workers.")
@click.option("--nproc-per-node", type=click.IntRange(1, 16), default=None,
              help="GPUs (torchrun) for training.")
@click.option("--timeout-s", type=float, default=None,
              help="Stop a training attempt after this many seconds (default 7200).")
@click.option("--threshold", type=float, default=None,
              help=f"Minimum test top-1 (default {Gate.threshold:g}; 0.7 with --preset demo).")
@click.option("--tolerance", type=float, default=None,
              help=f"Allowed drop below the alias's current model (default {Gate.tolerance:g}).")
@click.option("--force", is_flag=True, default=None,
              help="Promote regardless of the gate (recorded).")
@click.option("--model-name", default="flowers102", show_default=True)
@alias_option
@json_option
def retrain(preset: str | None, source: str | None, store: str | None, dataset: str | None,
            threshold: float | None, tolerance: float | None, force: bool | None,
            model_name: str, alias: str, as_json: bool, **training: Any) -> None:
    """Run the retrain flow: ingest, train, evaluate, register, promote past the gate.

    Reports to PREFECT_API_URL when set; otherwise Prefect runs it in ephemeral mode.
    """
    # Prefect's temporary server (no PREFECT_API_URL) gets 20 s to start by default, which a
    # busy 2-core machine can miss; give it more unless the user chose a value.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from pydantic import ValidationError

    from flows.retrain import RetrainParams, describe_parameter_error

    settings = load_settings(store=store, dataset=dataset)
    gate = {"threshold": threshold, "tolerance": tolerance, "force": force}
    try:
        params = RetrainParams.model_validate(retrain_params(
            preset, source, store, dataset, gate, model_name, alias, settings.cache_dir,
            training))
    except ValidationError as error:
        raise CliError(describe_parameter_error(error)) from None
    summary = run_retrain(params)
    if as_json:
        emit_json(summary)
        return
    print_retrain_summary(summary, model_name, alias, settings)


def run_retrain(params: Any) -> dict[str, Any]:
    from prefect.exceptions import TerminationSignal

    from flows.retrain import retrain_flowers

    stop_on_signals()
    try:
        return retrain_flowers(params)
    except (Stopped, TerminationSignal) as stopped:
        name = str(stopped) if isinstance(stopped, Stopped) else \
            signal.Signals(stopped.signal).name
        error = CliError(f"stopped by {name}: the flow run is marked crashed and its training "
                         f"child was stopped; the run's checkpoints stay on the store")
        error.exit_code = 128 + signal.Signals[name].value  # 143 for SIGTERM, as shells report
        raise error from None


def print_retrain_summary(summary: dict, model_name: str, alias: str,
                          settings: Settings) -> None:
    metrics = summary["metrics"]
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    click.echo(f"{verdict}: {model_name} version {summary['version']} "
               f"(run {summary['run_id']}, dataset {summary['dataset_version']})")
    click.echo(f"test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, "
               f"mean per-class {metrics['mean_class_accuracy']:.4f} on {metrics['n']} images")
    for reason in summary["reasons"]:
        click.echo(f"  - {reason}")
    examples = sorted((settings.cache_dir / settings.dataset).glob("*/test/*/*.jpg"))
    image = examples[0] if examples else Path("path/to/flower.jpg")
    click.echo(f"try: flowerml predict {image} --model {model_name}@{alias}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="flowerml")


if __name__ == "__main__":
    sys.exit(main())
