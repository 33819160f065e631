"""`flowerml compare A B`: two models evaluated on the same test manifest, image by image."""

from __future__ import annotations

import click

from flowerml.cli.app import cli, emit_json, json_option, store_option
from flowerml.settings import build_store, load_settings

CHANGES_SHOWN = 10


@cli.command("compare")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@store_option
@json_option
def compare_command(a: str, b: str, store: str | None, as_json: bool) -> None:
    """Compare B with A on the test images both were evaluated on, from their stored
    per-image predictions (nothing is run again).

    A and B are registry versions (NAME:VERSION, NAME@ALIAS, or NAME for its production
    version) or training runs (run:ID, the run's latest test evaluation). Prints top-1 of both,
    how often they predict the same label, the discordant images (right with one, wrong with
    the other), McNemar's exact test on them (two-sided p, and one-sided p that B is worse or
    better) and the classes whose accuracy changed most; everything is said of B relative to
    A. --json prints the whole comparison, every class included.

    Exits 0 with the comparison; 2 when either is unknown, has no stored predictions
    (evaluated before evaluation kept them: evaluate the run again and compare run:ID), or
    when the two were evaluated on different test manifests (both are named).
    """
    from flowerml.registry.comparison import compare, resolve_predictions

    target = build_store(load_settings(store=store))
    comparison = compare(resolve_predictions(target, a), resolve_predictions(target, b))
    if as_json:
        emit_json(comparison.to_json())
        return
    show(comparison)


def show(comparison) -> None:
    from flowerml.registry.comparison import biggest_changes

    a, b = comparison.a, comparison.b
    click.echo(f"{b} vs {a} on {comparison.dataset} {comparison.split} "
               f"({comparison.n:,} images)")
    delta = comparison.b_top1 - comparison.a_top1
    click.echo(f"  top-1: {comparison.a_top1:.4f} -> {comparison.b_top1:.4f} ({delta:+.4f})")
    click.echo(f"  agreement: {comparison.agreement:.2%} (the same label on "
               f"{comparison.agree:,} images)")
    click.echo(f"  discordant: {comparison.b_only:,} right only with {b}, "
               f"{comparison.a_only:,} right only with {a}")
    click.echo(f"  McNemar exact test: p = {comparison.p_two_sided:.4g} (two-sided); "
               f"{b} worse: p = {comparison.p_b_worse:.4g}, better: p = "
               f"{comparison.p_b_better:.4g}")
    changes = biggest_changes(comparison, CHANGES_SHOWN)
    changed = sum(1 for c in comparison.per_class if c.delta != 0)
    if not changes:
        click.echo("  per-class accuracy: no class changed")
        return
    shown = f"the {len(changes)} largest" if changed > len(changes) else "all"
    click.echo(f"  per-class accuracy: {changed} of {len(comparison.per_class)} classes "
               f"changed ({shown}):")
    for c in changes:
        click.echo(f"    {c.label} {c.name}: {c.a_accuracy:.4f} -> {c.b_accuracy:.4f} "
                   f"({c.delta:+.4f}, {c.support} images)")
