"""`flowerml predict`: top-k flower names for images, from a registry model or a run."""

from __future__ import annotations

from pathlib import Path

import click

from flowerml.cli.app import CliError, cli, emit_json, json_option, store_option
from flowerml.settings import build_store, load_settings


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None,
              help="NAME[@ALIAS|:VERSION] from the registry (default: flowers102@production).")
@click.option("--run", "run_id", default=None, help="Use a training run's weights instead.")
@store_option
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--device", default="auto", show_default=True)
@json_option
def predict(images: tuple[Path, ...], model_ref: str | None, run_id: str | None,
            store: str | None, top_k: int, device: str, as_json: bool) -> None:
    """Top-k flower names with probabilities for each IMAGE."""
    from flowerml.inference import load_trained_model, predict_images
    from flowerml.release import load_registered_model

    if model_ref and run_id:
        raise CliError("give --model or --run, not both")
    settings = load_settings(store=store)
    target = build_store(settings)
    trained = (load_trained_model(target, run_id, device) if run_id else
               load_registered_model(target, model_ref or "flowers102@production", device))
    predictions = predict_images(trained, list(images), top_k)
    if as_json:
        emit_json(predictions)
        return
    for item in predictions:
        best = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in item["predictions"])
        click.echo(f"{item['image']}: {best}")
