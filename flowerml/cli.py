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


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="flowerml")


if __name__ == "__main__":
    sys.exit(main())
