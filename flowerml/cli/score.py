"""`flowerml score`: a registry version's top-k flowers for a whole collection, in shards, in
this process (`python -m flows.score` runs the same as the Prefect flow `score-images`, on a
Dask cluster with --dask-address)."""

from __future__ import annotations

import sys
from typing import Any

import click

from flowerml.cli.app import EXIT_REFUSED, Choice, cli, emit_json, json_option, store_option
from flowerml.settings import build_store, load_settings

# flowerml.serving.scoring_plan.RUNTIMES, without imports
RUNTIME_CHOICES = ("auto", "onnx", "onnx-int8", "torch")


@cli.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("--model", "model_ref", default="flowers102@production", show_default=True,
              help="NAME[@ALIAS|:VERSION] from the registry; an alias is resolved once, when "
                   "the run starts.")
@click.option("--output", required=True,
              help="Where results go: a folder, file://PATH or s3://bucket[/prefix]; they land "
                   "in OUTPUT/<model>/<version>/<input-id>/.")
@click.option("--runtime", type=Choice(RUNTIME_CHOICES), default="auto", show_default=True,
              help="onnx: the version's ONNX export (it must have passed parity); "
                   "onnx-int8: its int8 graph (it must have passed its own gate); torch: "
                   "PyTorch eager; auto: onnx-int8 when it passed, else onnx when it passed.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Images decoded and scored at a time.")
@click.option("--shard-size", type=int, default=1000, show_default=True,
              help="Images per shard (one part file each).")
@click.option("--top-k", type=int, default=5, show_default=True,
              help="Flowers per image, best first.")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Shards scored at once in this process.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Threads per model call (default: the runtime's, one per core).")
@click.option("--drift-threshold", type=float, default=0.2, show_default=True,
              help="Population stability index (of top-1 probability or predicted class, "
                   "against the version's test baseline) above which drift is reported.")
@click.option("--review-below", type=float, default=None,
              help="Also write review.jsonl: the images whose top-1 probability is below "
                   "this, least sure first, for a person to label (then: flowerml ingest "
                   "--add review.jsonl).")
@store_option
@json_option
def score(input_uri: str, model_ref: str, output: str, runtime: str, batch_size: int,
          shard_size: int, top_k: int, parallel: int, threads: int | None,
          drift_threshold: float, review_below: float | None, store: str | None,
          as_json: bool) -> None:
    """Score every image of INPUT with a registry version, shard by shard.

    INPUT is a folder, an s3:// prefix, a glob over either, or a .txt/.json list of keys
    (relative to the list's folder), paths or s3:// URIs. It is listed once into shards of
    --shard-size images; each shard becomes OUTPUT/<model>/<version>/<input-id>/part-NNNNN.jsonl
    (one JSON row per image: key, labels, names, probabilities, or the image's error), and
    _SUCCESS.json is written last, with the drift of the scored images against the version's
    test baseline (histograms and their population stability index). Running it again skips
    finished shards. Exits 0 when every image was scored, 1 when some could not be read (their
    rows say why), 2 on bad input; drift does not change it.
    """
    from flowerml.io.storage_open import open_store
    from flowerml.serving.scoring import score_collection
    from flowerml.serving.scoring_plan import ScoringRequest

    settings = load_settings(store=store)
    registry_store = build_store(settings)
    output_store = open_store(output, s3=settings.s3_options(),
                              concurrency=settings.transfer_concurrency, name="--output")
    request = ScoringRequest(input=input_uri, model=model_ref, output=output, runtime=runtime,
                             batch_size=batch_size, shard_size=shard_size, top_k=top_k,
                             drift_threshold=drift_threshold, review_below=review_below)
    summary = score_collection(request, registry_store=registry_store,
                               output_store=output_store, s3=settings.s3_options(),
                               parallel=parallel, threads=threads, on_shard=report_shard)
    if as_json:
        emit_json(summary)
    else:
        print_summary(summary)
    if summary["failed"]:
        sys.exit(EXIT_REFUSED)


def report_shard(plan: Any, result: Any) -> None:
    done = "already done" if result.skipped else f"{result.seconds:.1f} s"
    click.echo(f"shard {result.shard + 1}/{plan.shards}: {result.images} images, "
               f"{result.failed} failed ({done})", err=True)


def print_summary(summary: dict[str, Any]) -> None:
    again = " (finished before: nothing to do)" if summary.get("already_complete") else ""
    click.echo(f"scored {summary['images']} images with {summary['label']} "
               f"({summary['runtime']}): {summary['scored']} ok, {summary['failed']} failed, "
               f"{summary['seconds']:.1f} s{again}")
    click.echo(f"results: {summary['output']}/ ({len(summary['parts'])} part files, "
               "_SUCCESS.json)")
    click.echo(drift_line(summary))
    review = summary.get("review")
    if review:
        click.echo(f"review: {review['images']} images below {review['below']:g} in "
                   f"{review['file']}, least sure first: fill in each label, then "
                   "flowerml ingest --add it")
    for failure in summary["failures"]:
        click.echo(f"failed: {failure['key']}: {failure['error']}")
    if summary["failed"] > len(summary["failures"]):
        click.echo(f"... and {summary['failed'] - len(summary['failures'])} more (see the "
                   "part files' error rows)")


def drift_line(summary: dict[str, Any]) -> str:
    """One line: drift found, none, or why it was not measured."""
    drift = summary.get("drift")
    if not drift:
        why = summary.get("drift_unavailable") or "finished before drift was measured"
        return f"drift: not measured ({why})"
    figures = (f"PSI top-1 probability {drift['psi_confidence']:.3f}, predicted class "
               f"{drift['psi_classes']:.3f}")
    if drift["drifted"]:
        return (f"drift found: {figures}, above {drift['threshold']:g}, against "
                f"{summary['label']}'s test baseline")
    return f"no drift: {figures}, at most {drift['threshold']:g}"
