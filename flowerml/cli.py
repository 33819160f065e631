"""The `flowerml` command: each subcommand reads the settings once and calls the library.

Bad input (any `UserError`, or an outage that outlived its retries) is printed as one line on
stderr with exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from flowerml.errors import FlowermlError
from flowerml.settings import Settings, build_store, load_settings


class CliError(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"flowerml: error: {self.format_message()}", err=True)


class FlowermlGroup(click.Group):
    """Turns library errors into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowermlError as error:
            raise CliError(str(error)) from None


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, sort_keys=True))


def settings_from(**overrides: object) -> Settings:
    return load_settings(**overrides)


@click.group(cls=FlowermlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowerml")
def cli() -> None:
    """flowerml: keep a Flowers-102 classifier fresh."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=10, show_default=True, help="Number of flower classes (1-102).")
@click.option("--per-class", default=20, show_default=True, help="Images per class (>= 3).")
@click.option("--image-size", default=128, show_default=True, help="Longest image side in px.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def synth(out_dir: Path, classes: int, per_class: int, image_size: int, seed: int,
          as_json: bool) -> None:
    """Write a synthetic archive in the exact Flowers-102 format into OUT_DIR."""
    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    spec = SyntheticSpec(classes=classes, per_class=per_class, image_size=image_size, seed=seed)
    paths = write_synthetic_archive(out_dir, spec)
    if as_json:
        emit_json({"dir": str(out_dir), "files": {k: str(v) for k, v in paths.items()},
                   "images": spec.num_images, "classes": classes})
    else:
        click.echo(f"wrote {spec.num_images} images of {classes} classes to {out_dir}")
        click.echo(f"next: flowerml ingest --source {out_dir}")


@cli.command()
@click.option("--source", default="official", show_default=True,
              help="'official', a folder, a base URL or an s3:// prefix holding the three files.")
@click.option("--store", default=None, help="Store URI (default: FLOWERML_STORE).")
@click.option("--dataset", default=None, help="Dataset name (default: FLOWERML_DATASET).")
@click.option("--verify/--no-verify", default=False,
              help="Check the official MD5s (always on for --source official).")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Threads for checking images (default: CPU count).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, no progress bar.")
def ingest(source: str, store: str | None, dataset: str | None, verify: bool,
           workers: int | None, as_json: bool) -> None:
    """Fetch Flowers-102 and publish its official split as ImageFolder trees on the store."""
    from flowerml.ingest import FetchOptions
    from flowerml.ingest import ingest as run_ingest
    from flowerml.progress import progress_for_terminal

    settings = settings_from(store=store, dataset=dataset)
    options = FetchOptions(verify=verify, retries=settings.download_retries,
                           timeout=settings.download_timeout, s3=settings.s3_options())
    with progress_for_terminal(quiet=as_json) as progress:
        result = run_ingest(source, build_store(settings), settings.dataset, settings.cache_dir,
                            options, workers=workers, progress=progress)
    if as_json:
        emit_json(result.to_json())
        return
    counts = result.counts
    click.echo(f"published {result.dataset}@{result.version} on {result.store}: "
               f"train {counts['train']}, valid {counts['valid']}, test {counts['test']}; "
               f"uploaded {result.uploaded}, already there {result.skipped}, "
               f"quarantined {result.quarantined}")


def new_run_id() -> str:
    import secrets
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def print_event(event: dict) -> None:
    click.echo(json.dumps(event, sort_keys=True))
    sys.stdout.flush()


@cli.command()
@click.option("--store", default=None, help="Store URI (default: FLOWERML_STORE).")
@click.option("--dataset", default=None, help="Dataset name (default: FLOWERML_DATASET).")
@click.option("--version", "dataset_version", default=None,
              help="Dataset version (default: the dataset's CURRENT).")
@click.option("--recipe", default="default", show_default=True,
              help="default, tutorial, linear-probe or demo; options below override it.")
@click.option("--arch", default=None, help="resnet18/34/50/101/152, alexnet, vgg16, vgg19.")
@click.option("--weights", default=None,
              help="imagenet, none, a local .safetensors/.pth, or an s3:// URI.")
@click.option("--strategy", default=None, help="finetune or linear-probe.")
@click.option("--freeze-stages", type=int, default=None, help="Lock the first K stages.")
@click.option("--augment", default=None, help="standard, tutorial or none.")
@click.option("--optimizer", default=None, help="adam, adamw or sgd.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Head learning rate.")
@click.option("--label-smoothing", type=float, default=None)
@click.option("--patience", type=int, default=None, help="Early-stopping patience (0: off).")
@click.option("--image-size", type=int, default=None)
@click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA.")
@click.option("--compile/--no-compile", "compile_model", default=None, help="torch.compile.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="DataLoader workers.")
@click.option("--run-id", default=None, help="Resume this run, or name a new one.")
@click.option("--seed", type=int, default=None)
@click.option("--json-progress", is_flag=True, help="One JSON line per epoch on stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def train(store: str | None, dataset: str | None, dataset_version: str | None, recipe: str,
          device: str, workers: int | None, run_id: str | None, json_progress: bool,
          as_json: bool, compile_model: bool | None, **options: Any) -> None:
    """Fine-tune a model on the published train split, selecting on valid."""
    from flowerml.progress import progress_for_terminal
    from flowerml.recipes import build_config
    from flowerml.training import fit

    settings = settings_from(store=store, dataset=dataset)
    config = build_config(recipe, compile=compile_model, **options)
    on_event = print_event if json_progress else None
    with progress_for_terminal(quiet=as_json or json_progress) as progress:
        result = fit(config, store=build_store(settings), dataset=settings.dataset,
                     run_id=run_id or new_run_id(), cache_dir=settings.cache_dir,
                     version=dataset_version, device=device, workers=workers,
                     s3=settings.s3_options(), on_event=on_event, progress=progress)
    if result.rank != 0:
        return  # under torchrun, rank 0 speaks for the run
    if as_json:
        emit_json(result.to_json())
        return
    resumed = (f", resumed from epoch {result.resumed_from_epoch}"
               if result.resumed_from_epoch is not None else "")
    click.echo(f"run {result.run_id}: best valid top-1 {result.best_valid_top1:.4f} "
               f"(epoch {result.best_epoch} of {result.epochs_run}{resumed}); "
               f"{result.images_per_second:.1f} images/s; weights {result.checkpoint}")
    click.echo(f"next: flowerml evaluate --run {result.run_id}")


@cli.command()
@click.option("--run", "run_id", required=True, help="The training run to evaluate.")
@click.option("--store", default=None, help="Store URI (default: FLOWERML_STORE).")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test",
              show_default=True)
@click.option("--version", "dataset_version", default=None,
              help="Dataset version (default: the one the run trained on).")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=None)
@click.option("--json", "as_json", is_flag=True)
def evaluate(run_id: str, store: str | None, split: str, dataset_version: str | None,
             device: str, workers: int | None, as_json: bool) -> None:
    """Evaluate a run's best weights on a split; writes the report next to the run."""
    from flowerml.inference import evaluate_run

    settings = settings_from(store=store)
    outcome = evaluate_run(build_store(settings), run_id, cache_dir=settings.cache_dir,
                           split=split, version=dataset_version, device=device, workers=workers)
    if as_json:
        emit_json(outcome.to_json())
        return
    summary = outcome.metrics.summary()
    click.echo(f"{split}: top-1 {summary['top1']:.4f}, top-5 {summary['top5']:.4f}, "
               f"mean per-class {summary['mean_class_accuracy']:.4f}, loss "
               f"{summary['loss']:.4f} on {summary['n']} images; report {outcome.report_key}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_id", required=True, help="The training run whose weights to use.")
@click.option("--store", default=None, help="Store URI (default: FLOWERML_STORE).")
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def predict(images: tuple[Path, ...], run_id: str, store: str | None, top_k: int, device: str,
            as_json: bool) -> None:
    """Top-k flower names with probabilities for each IMAGE."""
    from flowerml.inference import load_trained_model, predict_images

    settings = settings_from(store=store)
    trained = load_trained_model(build_store(settings), run_id, device)
    predictions = predict_images(trained, list(images), top_k)
    if as_json:
        emit_json(predictions)
        return
    for item in predictions:
        best = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in item["predictions"])
        click.echo(f"{item['image']}: {best}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="flowerml")


if __name__ == "__main__":
    sys.exit(main())
