"""The `flowerml` command: each subcommand reads the settings once and calls the library.

Bad input (any `UserError`, or an outage that outlived its retries) is printed as one line on
stderr with exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from flowerml.errors import FlowermlError
from flowerml.promotion import Gate
from flowerml.recipes import RECIPE_NAMES, Device
from flowerml.registry import DEFAULT_ALIAS
from flowerml.settings import build_store, load_settings


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
        except click.UsageError as error:  # a subcommand's bad option: one line, exit 2
            raise CliError(error.format_message()) from None


DEVICES: tuple[str, ...] = get_args(Device)  # the same tuple as flowerml.distributed

# Options every command spells the same way, with their defaults from one place.
store_option = click.option("--store", default=None,
                            help="Store URI: a directory or s3://bucket[/prefix] "
                                 "(default: FLOWERML_STORE).")
dataset_option = click.option("--dataset", default=None,
                              help="Dataset name (default: FLOWERML_DATASET).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object on stdout, and nothing else.")
alias_option = click.option("--alias", default=DEFAULT_ALIAS, show_default=True,
                            help="The registry alias.")


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, sort_keys=True))


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
@json_option
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
@store_option
@dataset_option
@click.option("--verify/--no-verify", default=False,
              help="Check the official MD5s (always on for --source official).")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Threads for checking images (default: CPU count).")
@json_option
def ingest(source: str, store: str | None, dataset: str | None, verify: bool,
           workers: int | None, as_json: bool) -> None:
    """Fetch Flowers-102 and publish its official split as ImageFolder trees on the store."""
    from flowerml.ingest import FetchOptions
    from flowerml.ingest import ingest as run_ingest
    from flowerml.progress import progress_for_terminal

    settings = load_settings(store=store, dataset=dataset)
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


class Choice(click.Choice):
    """click.Choice whose refusal is one line naming the option, like every other bad input."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        option = param.opts[0] if param else "value"
        raise CliError(f"{option} must be one of {', '.join(map(str, self.choices))}: "
                       f"got {value!r}")


def training_options(command: Callable) -> Callable:
    """One option per `TrainConfig` field, its type, choices and help taken from the model."""
    from flowerml.recipes import TrainConfig, option_name

    for name, info in reversed(TrainConfig.model_fields.items()):
        help_text = f"{(info.description or info.title).rstrip('.')}. Default: the recipe's " \
                    f"({info.default!r} in 'default')."
        if info.annotation is bool:
            flag = option_name(name)
            decorator = click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                     help=help_text)
        else:
            choices = get_args(info.annotation)
            kind = Choice(choices) if choices else info.annotation
            decorator = click.option(option_name(name), name, type=kind, default=None,
                                     help=help_text)
        command = decorator(command)
    return command


@cli.command()
@store_option
@dataset_option
@click.option("--version", "dataset_version", default=None,
              help="Dataset version (default: the dataset's CURRENT).")
@click.option("--recipe", type=Choice(RECIPE_NAMES), default="default", show_default=True,
              help="A named set of the options below; explicit options override it.")
@training_options
@click.option("--config", "config_json", default=None,
              help="A whole training config as JSON, instead of --recipe and the options above.")
@click.option("--device", type=Choice(DEVICES), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="DataLoader workers.")
@click.option("--run-id", default=None, help="Resume this run, or name a new one.")
@click.option("--exit-with-parent", type=int, default=None, hidden=True,
              help="Stop when this process id is gone (set by the launcher).")
@click.option("--json-progress", is_flag=True, help="One JSON line per epoch on stdout.")
@json_option
def train(store: str | None, dataset: str | None, dataset_version: str | None, recipe: str,
          config_json: str | None, device: str, workers: int | None, run_id: str | None,
          exit_with_parent: int | None, json_progress: bool, as_json: bool,
          **options: Any) -> None:
    """Fine-tune a model on the published train split, selecting on valid."""
    from flowerml.launch import exit_with_parent_process
    from flowerml.progress import progress_for_terminal
    from flowerml.recipes import build_config, load_config
    from flowerml.training import fit

    if exit_with_parent is not None:
        exit_with_parent_process(exit_with_parent)
    settings = load_settings(store=store, dataset=dataset)
    if config_json is not None and any(v is not None for v in options.values()):
        raise CliError("give --config or training options, not both")
    config = load_config(config_json) if config_json else build_config(recipe, **options)
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
@store_option
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test",
              show_default=True)
@click.option("--version", "dataset_version", default=None,
              help="Dataset version (default: the one the run trained on).")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=None)
@json_option
def evaluate(run_id: str, store: str | None, split: str, dataset_version: str | None,
             device: str, workers: int | None, as_json: bool) -> None:
    """Evaluate a run's best weights on a split; writes the report next to the run."""
    from flowerml.inference import evaluate_run

    settings = load_settings(store=store)
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


@cli.group()
def registry() -> None:
    """The model registry: versions, aliases, promotion, rollback."""


def open_registry(name: str, store: str | None):
    from flowerml.registry import Registry

    settings = load_settings(store=store)
    return Registry(build_store(settings), name), settings


def require_model(entry) -> None:
    """An unknown model is one line and exit 2 in every registry command that names one."""
    if not entry.has_versions():
        raise CliError(f"model '{entry.model}' has no versions")


def version_text(version: int | None) -> str:
    return "-" if version is None else f"{version:06d}"


@registry.command("list")
@store_option
@json_option
def registry_list(store: str | None, as_json: bool) -> None:
    """Every registered model, with its version count and production version.

    A store with no models prints nothing (`[]` with --json) and exits 0.
    """
    from flowerml.registry import Registry, list_models

    target = build_store(load_settings(store=store))
    rows = []
    for name in list_models(target):
        entry = Registry(target, name)
        production = entry.alias(DEFAULT_ALIAS)
        rows.append({"model": name, "versions": len(entry.versions()),
                     "production": production.version if production else None})
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(f"{row['model']}: {row['versions']} version(s), production "
                   f"{version_text(row['production'])}")


@registry.command("show")
@click.argument("name")
@store_option
@json_option
def registry_show(name: str, store: str | None, as_json: bool) -> None:
    """A model's versions (metrics, run, committed) and aliases.

    An unknown model is an error (exit 2), with or without --json.
    """
    entry, _ = open_registry(name, store)
    versions = [{"version": v.version, "committed": v.committed,
                 "top1": v.card.get("metrics", {}).get("top1"),
                 "run_id": v.card.get("lineage", {}).get("run_id"),
                 "dataset_version": v.card.get("lineage", {}).get("dataset_version")}
                for v in entry.versions()]
    if not versions:
        raise CliError(f"model '{name}' has no versions")
    aliases = {name: state.version for name, state in entry.aliases().items()}
    if as_json:
        emit_json({"model": name, "versions": versions, "aliases": aliases})
        return
    for row in versions:
        tags = [a for a, v in aliases.items() if v == row["version"]]
        top1 = f"{row['top1']:.4f}" if isinstance(row["top1"], float) else "-"
        state = "" if row["committed"] else " (not committed)"
        click.echo(f"{row['version']:06d}{state}: top-1 {top1}, run {row['run_id']}"
                   + (f"  [{', '.join(tags)}]" if tags else ""))


def move_result(name: str, alias: str, version: int | None, previous: int | None,
                promoted: bool, reasons: list[str], as_json: bool) -> None:
    """What `registry promote` and `registry rollback` print."""
    if as_json:
        emit_json({"model": name, "alias": alias, "version": version, "previous": previous,
                   "promoted": promoted, "reasons": reasons})
        return
    click.echo(f"{'promoted' if promoted else 'not promoted'}: {name}:{version_text(version)}"
               f" -> {alias}")
    for reason in reasons:
        click.echo(f"  - {reason}")


@registry.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@alias_option
@click.option("--threshold", type=float, default=Gate.threshold, show_default=True,
              help="Minimum test top-1.")
@click.option("--tolerance", type=float, default=Gate.tolerance, show_default=True,
              help="Allowed drop below the alias's current model.")
@click.option("--force", is_flag=True, help="Promote regardless of the gate (recorded).")
@store_option
@click.option("--device", default="auto", show_default=True)
@json_option
def registry_promote(name: str, version: int, alias: str, threshold: float, tolerance: float,
                     force: bool, store: str | None, device: str, as_json: bool) -> None:
    """Move ALIAS to VERSION if it clears the gate against the current alias.

    Exits 0 when promoted, 1 when the gate refuses (nothing moves), 2 on bad input. --json
    prints {model, alias, version, previous, promoted, reasons}; `previous` is the version the
    alias pointed at before (null if unset).
    """
    from flowerml.promotion import Gate, promote_version

    gate = Gate(threshold=threshold, tolerance=tolerance)
    entry, settings = open_registry(name, store)
    require_model(entry)
    before = entry.alias(alias)
    promoted, reasons, state = promote_version(entry, version, alias=alias, gate=gate,
                                               force=force, cache_dir=settings.cache_dir,
                                               device=device)
    if state is not None and state.version == version and (before is None
                                                          or before.version != version):
        previous = state.previous  # moved: the version it replaced
    else:
        now = entry.alias(alias) if state is None else state
        previous = now.version if now else None  # nothing moved: where the alias is
    move_result(name, alias, version, previous, promoted, reasons, as_json)
    if not promoted:
        sys.exit(1)


@registry.command("rollback")
@click.argument("name")
@alias_option
@store_option
@json_option
def registry_rollback(name: str, alias: str, store: str | None, as_json: bool) -> None:
    """Point ALIAS back at the version promoted before the current one.

    Each rollback steps one further back along the alias's promotions, skipping versions
    that were rolled away from (a second rollback never returns to the first one's version);
    with nothing earlier it is refused (exit 2). Recorded in the history as a rollback.
    --json prints {model, alias, version, previous, promoted, reasons}.
    """
    entry, _ = open_registry(name, store)
    require_model(entry)
    state = entry.rollback(alias)
    reason = (f"rolled back from {version_text(state.previous)} to the version promoted "
              "before it")
    if as_json:
        move_result(name, alias, state.version, state.previous, True, [reason], True)
        return
    click.echo(f"{name}@{alias} -> {state.version:06d} (was {version_text(state.previous)})")


@registry.command("history")
@click.argument("name")
@alias_option
@store_option
@json_option
def registry_history(name: str, alias: str, store: str | None, as_json: bool) -> None:
    """Every move of ALIAS, oldest first (versions zero-padded, '-' for unset).

    An unknown model or an alias that was never set is an error (exit 2), with or without
    --json.
    """
    from flowerml.registry import is_rollback

    entry, _ = open_registry(name, store)
    require_model(entry)
    rows = entry.history(alias)
    if not rows:
        raise CliError(f"{name} has no alias '{alias}'")
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        tags = (" (forced)" if row.get("forced") else "") + (" (rollback)" if is_rollback(row)
                                                             else "")
        click.echo(f"{row['seq']:>4} {row['time']} {version_text(row['from'])} -> "
                   f"{version_text(row['to'])}{tags}: {row['reason']}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="flowerml")


if __name__ == "__main__":
    sys.exit(main())
