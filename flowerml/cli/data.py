"""`flowerml synth` and `flowerml ingest`: archives in the official format, published splits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from flowerml.cli.app import (
    Choice,
    CliError,
    cli,
    dataset_option,
    emit_json,
    json_option,
    store_option,
)
from flowerml.settings import build_store, load_settings

if TYPE_CHECKING:
    from flowerml.data.ingest import IngestResult
    from flowerml.io.locations import ImageFolderLocation

# The synthetic archive's bounds (flowerml.data.synthetic's MAX_IMAGES and MAX_IMAGE_SIZE), for the
# help text without importing numpy, scipy and PIL for every `flowerml` command.
MAX_IMAGES = 99_999
MAX_IMAGE_SIZE = 4096


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=10, show_default=True, help="Number of flower classes (1-102).")
@click.option("--per-class", default=20, show_default=True,
              help=f"Images per class (3 or more; classes x per-class at most {MAX_IMAGES}).")
@click.option("--image-size", default=128, show_default=True,
              help=f"Longest image side in px (32-{MAX_IMAGE_SIZE}).")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--force", is_flag=True,
              help="Overwrite an archive already in OUT_DIR (refused without it).")
@json_option
def synth(out_dir: Path, classes: int, per_class: int, image_size: int, seed: int, force: bool,
          as_json: bool) -> None:
    """Write a synthetic archive in the Flowers-102 format into OUT_DIR.

    The images are drawn, not photographed, and imagelabels.mat says so (an extra
    `flowerml_synthetic` variable): ingest marks the published version synthetic, and model
    cards and evaluation reports of it say so.
    """
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    spec = SyntheticSpec(classes=classes, per_class=per_class, image_size=image_size, seed=seed)
    paths = write_synthetic_archive(out_dir, spec, force=force)
    if as_json:
        emit_json({"dir": str(out_dir), "files": {k: str(v) for k, v in paths.items()},
                   "images": spec.num_images, "classes": classes})
    else:
        click.echo(f"wrote {spec.num_images} images of {classes} classes to {out_dir}")
        click.echo(f"next: flowerml ingest --source {out_dir}")


@cli.command()
@click.option("--source", default=None,
              help="Where the three files are: 'official' (the Oxford site, the default), a "
                   "folder path, file://PATH, an http(s):// base URL or s3://bucket[/prefix]; "
                   "or imagefolder:PATH, a dataset of your own classes: PATH (a folder or "
                   "s3:// prefix) holds train/ valid/ test/ of class folders, or class folders "
                   "alone with --split-ratios.")
@click.option("--split-ratios", default=None, metavar="TRAIN,VALID,TEST",
              help="With --source imagefolder:PATH of class folders alone: split each class "
                   "by these ratios (e.g. 0.8,0.1,0.1), deterministically.")
@click.option("--seed", default=None, type=int,
              help="With --split-ratios: the seed of the split (default 0).")
@click.option("--add", "add_source", default=None, metavar="SOURCE",
              help="Publish CURRENT plus the labelled images of SOURCE as a new version: a "
                   "folder (local or s3://) of class folders named by label number or class "
                   "name, or a .csv/.jsonl list of path,label.")
@click.option("--split", "target_split", type=Choice(("train", "valid")), default="train",
              show_default=True, help="With --add: the split the images go to (test never "
                                      "changes).")
@store_option
@dataset_option
@click.option("--verify/--no-verify", default=False,
              help="Check the official MD5s (always on for --source official).")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Threads for checking images (default: CPU count).")
@json_option
def ingest(source: str | None, split_ratios: str | None, seed: int | None,
           add_source: str | None, target_split: str, store: str | None,
           dataset: str | None, verify: bool, workers: int | None, as_json: bool) -> None:
    """Fetch Flowers-102 and publish its official split as ImageFolder trees on the store;
    with --source imagefolder:PATH, publish a dataset of your own classes (its folder names);
    with --add, add labelled images to the CURRENT version as a new one."""
    from flowerml.core.progress import progress_for_terminal
    from flowerml.data.ingest import ingest as run_ingest
    from flowerml.data.source_files import FetchOptions
    from flowerml.io.locations import ImageFolderLocation, parse_source

    if add_source is not None and source is not None:
        raise CliError("--add and --source: give one (--source ingests an archive, --add "
                       "adds images to a published dataset)")
    where = parse_source(source or "official", "--source")  # before any setting or store
    for option, value in (("--split-ratios", split_ratios), ("--seed", seed)):
        if value is not None and not isinstance(where, ImageFolderLocation):
            raise CliError(f"{option}: only with --source imagefolder:PATH (a folder of class "
                           "folders to split)")
    if add_source is not None:
        add(add_source, target_split, store, dataset, workers, as_json)
        return
    if isinstance(where, ImageFolderLocation):
        image_folder(where, split_ratios, seed, store, dataset, workers, as_json)
        return
    settings = load_settings(store=store, dataset=dataset)
    options = FetchOptions(verify=verify, retries=settings.download_retries,
                           timeout=settings.download_timeout, s3=settings.s3_options())
    with progress_for_terminal(quiet=as_json) as progress:
        result = run_ingest(where, build_store(settings), settings.dataset, settings.cache_dir,
                            options, workers=workers, progress=progress)
    if as_json:
        emit_json(result.to_json())
        return
    echo_published(result)
    if result.synthetic:
        click.echo("synthetic data (drawn by flowerml synth): not Flowers-102 photographs")


def image_folder(where: ImageFolderLocation, split_ratios: str | None, seed: int | None,
                 store: str | None, dataset: str | None, workers: int | None,
                 as_json: bool) -> None:
    """`ingest --source imagefolder:PATH`: PATH's class folders published, printed with their
    names (the dataset's classes)."""
    from flowerml.core.progress import progress_for_terminal
    from flowerml.data.imagefolder import publish_image_folder

    settings = load_settings(store=store, dataset=dataset)
    with progress_for_terminal(quiet=as_json) as progress:
        result, class_names = publish_image_folder(
            where, build_store(settings), settings.dataset, settings.cache_dir,
            split_ratios=split_ratios, seed=seed or 0, s3=settings.s3_options(),
            workers=workers, progress=progress)
    if as_json:
        emit_json({**result.to_json(), "classes": list(class_names)})
        return
    echo_published(result)
    click.echo(f"classes ({len(class_names)}): {', '.join(class_names)}")


def echo_published(result: IngestResult) -> None:
    counts = result.counts
    click.echo(f"published {result.dataset}@{result.version} at {result.location}: "
               f"train {counts['train']}, valid {counts['valid']}, test {counts['test']}; "
               f"uploaded {result.uploaded}, already there {result.skipped}, "
               f"quarantined {result.quarantined}")
    if result.replaced:
        click.echo(f"CURRENT moved from {result.replaced} to {result.version}")
    if result.current != result.version:
        click.echo(f"CURRENT stays {result.current}: it adds labelled images on top of "
                   f"{result.version} (flowerml ingest --add)")


def add(source: str, split: str, store: str | None, dataset: str | None, workers: int | None,
        as_json: bool) -> None:
    """`ingest --add`: CURRENT plus SOURCE's images, printed as what was added and skipped."""
    from flowerml.core.progress import progress_for_terminal
    from flowerml.data.add import add_images

    if not source.strip():
        raise CliError("--add must not be empty")
    settings = load_settings(store=store, dataset=dataset)
    with progress_for_terminal(quiet=as_json) as progress:
        result = add_images(build_store(settings), settings.dataset, source,
                            settings.cache_dir, split=split, s3=settings.s3_options(),
                            workers=workers, progress=progress)
    if as_json:
        emit_json(result.to_json())
        return
    if result.published:
        click.echo(f"published {result.dataset}@{result.version} on top of {result.parent} at "
                   f"{result.location}: added {result.added_images} to {result.split}; "
                   f"uploaded {result.uploaded} ({result.uploaded_bytes} bytes)")
        click.echo(f"CURRENT moved from {result.parent} to {result.version}")
    else:
        click.echo(f"nothing new: {result.dataset}@{result.version} (CURRENT) already holds "
                   "every image; nothing published")
    for kind, what in (("already_present", "already present"), ("leakage", "leakage"),
                       ("rejected", "rejected")):
        items = getattr(result, kind)
        if items:
            click.echo(f"{what}: {len(items)}")
        for item in items:
            click.echo(f"  {item['path']}: " + (item["reason"] if "reason" in item
                                                 else f"same bytes as {item['key']}"))
