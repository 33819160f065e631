"""`flowerml datasets list|show`: the published datasets on a store and their versions."""

from __future__ import annotations

import click

from flowerml.cli.app import CliError, cli, emit_json, emit_listing, json_option, store_option
from flowerml.settings import build_store, load_settings


@cli.group()
def datasets() -> None:
    """Published datasets on the store: list them, show one's versions."""


def version_line(version) -> str:
    """`<version> [CURRENT]: train N, valid N, test N; C classes; Q quarantined; synthetic`."""
    tag = " [CURRENT]" if version.current else ""
    if not version.complete or version.problem:
        return f"{version.version}{tag}: {version.problem}"
    counts = ", ".join(f"{split} {n}" for split, n in version.counts.items())
    kind = "synthetic" if version.synthetic else "not synthetic"
    return (f"{version.version}{tag}: {counts}; {version.classes} classes; "
            f"{version.quarantined} quarantined; {kind}")


def addition_line(version) -> str:
    """`on top of <parent>: added train 4 (002: 3, 003: 1); skipped: 1 leakage, 1 rejected`;
    `ingested` for a version no addition published."""
    if version.parent is None:
        return "ingested"
    added = "; ".join(f"added {split} {sum(classes.values())} (" + ", ".join(
        f"{folder}: {n}" for folder, n in classes.items()) + ")"
        for split, classes in (version.added or {}).items()) or "added nothing"
    skipped = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in
                        (version.skipped or {}).items() if n)
    return f"on top of {version.parent}: {added}" + (f"; skipped {skipped}" if skipped else "")


@datasets.command("list")
@store_option
@json_option
def datasets_list(store: str | None, as_json: bool) -> None:
    """Every dataset: its CURRENT version's counts, quarantine and whether it is synthetic,
    and how many versions it has.

    A store with no datasets prints nothing on stdout (`[]` with --json) and exits 0.
    """
    from flowerml.registry.inventory import list_datasets

    target = build_store(load_settings(store=store))
    found = list_datasets(target)
    if emit_listing(found, as_json=as_json, empty=f"no datasets on {target.uri}"):
        return
    for dataset in found:
        current = next((v for v in dataset.versions if v.current), None)
        shown = version_line(current) if current else "no CURRENT version"
        click.echo(f"{dataset.name}: {len(dataset.versions)} version(s), {shown}; "
                   f"{dataset.location}" + (f" ({dataset.problem})" if dataset.problem else ""))


@datasets.command("show")
@click.argument("name", required=False)
@store_option
@json_option
def datasets_show(name: str | None, store: str | None, as_json: bool) -> None:
    """One dataset's versions (CURRENT first): counts per split, classes, quarantined images
    and why, synthetic or not, and where each lives.

    NAME defaults to FLOWERML_DATASET. An unknown dataset is an error (exit 2). Each
    version's manifest is verified as `flowerml train` verifies it (its entries hash to the
    version; CURRENT's records its sha256): a version that fails is shown with its problem,
    and the command exits 2 with that problem as its error line.
    """
    from flowerml.registry.inventory import describe_dataset

    settings = load_settings(store=store)
    target = build_store(settings)
    dataset = describe_dataset(target, name or settings.dataset)
    verify_versions(target, dataset)
    problems = [dataset.problem] if dataset.problem else []
    problems += [f"version {v.version}: {v.problem}" for v in dataset.versions
                 if v.complete and v.problem]
    if as_json:
        emit_json(dataset.to_json())
    else:
        print_dataset(dataset)
    if problems:
        raise CliError(problems[0] if len(problems) == 1 else
                       f"{problems[0]} (and {len(problems) - 1} more problem(s) above)",
                       "bad-input")


def verify_versions(store, dataset) -> None:
    """Each published version's manifest checked the way training reads it
    (`flowerml.data.manifest.resolve_dataset`); a refusal becomes the version's `problem`."""
    from flowerml.core.errors import DataError
    from flowerml.data.manifest import resolve_dataset

    for version in dataset.versions:
        if version.complete and not version.problem:
            try:
                resolve_dataset(store, dataset.name, version.version)
            except DataError as error:
                version.problem = str(error)


def print_dataset(dataset) -> None:
    click.echo(f"dataset {dataset.name}: CURRENT {dataset.current or '-'}; {dataset.location}")
    if dataset.problem:
        click.echo(f"  problem: {dataset.problem}")
    by_name = {version.version: version for version in dataset.versions}
    if len(dataset.chain) > 1:
        click.echo(f"  chain (CURRENT first): {' <- '.join(dataset.chain)}")
        for name in dataset.chain:
            click.echo(f"    {name}: {addition_line(by_name[name])}")
    for version in dataset.versions:
        click.echo(f"  {version_line(version)}")
        click.echo(f"    {version.location}")
        for image in version.quarantine or []:
            click.echo(f"    quarantined {image.get('image', '?')} ({image.get('split', '?')}, "
                       f"label {image.get('label', '?')}): {image.get('reason', image)}")
