"""Batch scoring: a registry version's top-k flowers for every image of a collection, in shards.

INPUT is a local folder, an `s3://bucket/prefix`, a glob over either (`photos/**/*.jpg`,
`s3://bucket/photos/*.jpg`), or a list file (`.txt`: one key per line, `#` comments; `.json`: an
array of strings), local or on S3, whose entries are paths or keys relative to the list's own
folder, absolute paths, or `s3://` URIs: the one rule set of `flowerml.serving.inputs`, which
`flowerml predict` follows too. A folder, a glob or a prefix gives the files named like images;
a list's entries are all scored, and one that is not an image is that key's error row.

INPUT is listed once, streamed (never held in memory), into numbered shards of `shard_size`
keys (`flowerml.serving.scoring_plan`, `flowerml.serving.scoring_spool`); each shard is scored on its own
(`flowerml.serving.scoring_shards`: a Prefect task, or a thread of `flowerml score`), one shard in
memory at a time. This module writes a run's success record once every part is there, and runs
a whole run in one process. Everything goes under the output store (a folder or an `s3://`
prefix):

```
<model>/<NNNNNN>/<input-id>/_shards/NNNNN.json  the keys of shard N (written before any part)
<model>/<NNNNNN>/<input-id>/_listing.json       the listing's record, after its shards: input,
                                                root, counts, shard size, runtime, top-k
<model>/<NNNNNN>/<input-id>/part-NNNNN.jsonl    one row per key of shard N, in listing order:
                                                {"key", "labels", "names", "probabilities"}
                                                or {"key", "error"}; create-only
<model>/<NNNNNN>/<input-id>/review.jsonl        with --review-below P: the images whose top-1
                                                probability is below P, least sure first,
                                                for a person to label (then ingest --add)
<model>/<NNNNNN>/<input-id>/_SUCCESS.json       written LAST, create-only: counts, failures,
                                                model version and sha256, runtime, seconds,
                                                drift against the version's test baseline
```

Drift: `_SUCCESS.json`'s `drift` holds the histograms of top-1 probability and predicted class
of the scored images, the version's test baseline, the population stability index of each
and whether either is above the run's `drift_threshold` (`flowerml.serving.scoring_drift`,
`flowerml.evaluation.drift`); `drift_unavailable` says why a run has none.

`<input-id>` is a content hash of the listing (its root, shard size and every key, in order),
so scoring the same collection with the same version again lands in the same folder and skips
every shard whose part exists: a killed run resumes, and two runs on one output never corrupt
each other (a part is written whole, once; the loser of a race keeps the winner's). An image
that cannot be read or decoded is a row with its error, never a failed shard: a missing key, a
key the credentials may not read, a FIFO or a device (refused before it is opened, so nothing
blocks or reads forever), a file over `flowerml.serving.inputs.MAX_IMAGE_BYTES`. The alias is
resolved once, when the run starts, so every shard of a run uses the same version.

Runtimes: `onnx` runs the version's ONNX export (it must have passed parity, and its sha256 is
verified before it runs), `torch` runs the safetensors weights (sha-verified) in eager mode,
`auto` picks onnx when a passing export exists. Both take the export's input contract: uint8
RGB pixels, the short side resized to the card's recorded resize (round(S*256/224) for a model
without weights of its own) and the centre S x S cropped; a large
JPEG is decoded reduced first (`flowerml.serving.prediction.open_image`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from flowerml.core.documents import DocumentError, Sha256, StoredDocument, plain, read_document
from flowerml.evaluation.drift import DriftFigures
from flowerml.io.storage import ObjectNotFound, PreconditionFailed, S3Options, Store
from flowerml.serving.scoring_drift import ReviewRecord, run_figures
from flowerml.serving.scoring_plan import ScoringError, ScoringPlan, ScoringRequest, plan_scoring
from flowerml.serving.scoring_shards import LISTED_FAILURES, ShardResult, score_shard

SUCCESS = "_SUCCESS.json"


class DamagedSuccessRecord(DocumentError, ScoringError):
    """A `_SUCCESS.json` that does not read as `ScoringSuccess`."""


class ScoringSuccess(StoredDocument):
    """`<model>/<NNNNNN>/<input-id>/_SUCCESS.json`, written last and create-only."""

    input: str
    root: str
    input_id: str
    model: str
    version: int
    label: str
    runtime: str
    sha256: Sha256
    weights_sha256: Sha256
    images: int
    scored: int
    failed: int
    failures: list[dict[str, str]]
    failures_listed: int
    shards: int
    shard_size: int
    shards_skipped: int
    top_k: int
    batch_size: int
    seconds: float
    output: str
    parts: list[str]
    finished_at: str
    drift: DriftFigures | None = None
    drift_unavailable: str | None = None
    review: ReviewRecord | None = None


def read_success(output_store: Store, plan: ScoringPlan) -> dict[str, Any] | None:
    """The run's `_SUCCESS.json` (validated), or None while it is not finished."""
    key = plan.key(SUCCESS)
    try:
        raw = output_store.get_bytes(key)
    except ObjectNotFound:
        return None
    return plain(read_document(ScoringSuccess, raw, output_store.location(key),
                               DamagedSuccessRecord))


def finish_scoring(plan: ScoringPlan, results: Iterable[ShardResult], output_store: Store,
                   seconds: float, *, registry_store: Store) -> dict[str, Any]:
    """Write review.jsonl (when asked) and `_SUCCESS.json` with the run's drift figures once
    every shard's part is there; returns it (or the one a concurrent run wrote first)."""
    by_shard = {r.shard: r for r in results}
    parts = {info.key for info in output_store.list(plan.key("part-"))}
    missing = [s for s in range(plan.shards) if s not in by_shard or plan.part_key(s) not in parts]
    if missing:
        raise ScoringError(f"{len(missing)} shards of {output_store.location(plan.prefix)} "
                           f"have no part (first: {missing[0]}): run again to finish them")
    ordered = [by_shard[s] for s in range(plan.shards)]
    failures = [f for r in ordered for f in r.failures][:LISTED_FAILURES]
    failed = sum(r.failed for r in ordered)
    success = plain(ScoringSuccess(
        input=plan.input, root=plan.root, input_id=plan.input_id,
        model=plan.model, version=plan.version, label=plan.label,
        runtime=plan.runtime, sha256=plan.sha256, weights_sha256=plan.weights_sha256,
        images=sum(r.images for r in ordered), scored=sum(r.images - r.failed for r in ordered),
        failed=failed, failures=failures, failures_listed=len(failures),
        shards=plan.shards, shard_size=plan.shard_size,
        shards_skipped=sum(r.skipped for r in ordered), top_k=plan.top_k,
        batch_size=plan.batch_size, seconds=round(seconds, 3),
        output=output_store.location(plan.prefix),
        parts=[plan.part_key(s).rsplit("/", 1)[1] for s in range(plan.shards)],
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **run_figures(plan, registry_store, output_store)))
    try:
        output_store.put_bytes(plan.key(SUCCESS), json.dumps(success, indent=2).encode(),
                               if_none_match=True)
    except PreconditionFailed:  # a concurrent run finished first: its record stands
        return read_success(output_store, plan) or success
    return success


# --------------------------------------------------------------------------------------------
# One process (the CLI)


def score_collection(request: ScoringRequest, *, registry_store: Store, output_store: Store,
                     s3: S3Options | None = None, parallel: int = 1,
                     threads: int | None = None,
                     on_shard: Callable[[ScoringPlan, ShardResult], None] | None = None
                     ) -> dict[str, Any]:
    """Plan, score every shard on a pool of `parallel` threads in this process, finish.
    A finished output is returned as it is (`already_complete`)."""
    started = time.monotonic()
    plan = plan_scoring(request, registry_store=registry_store, output_store=output_store,
                        s3=s3)
    done = read_success(output_store, plan)
    if done is not None:
        return {**done, "already_complete": True}

    def run(shard: int) -> ShardResult:
        result = score_shard(plan, shard, registry_store=registry_store,
                             output_store=output_store, s3=s3, threads=threads)
        if on_shard:
            on_shard(plan, result)
        return result

    pool = ThreadPoolExecutor(max(parallel, 1), thread_name_prefix="flowerml-shard")
    try:
        results = list(pool.map(run, range(plan.shards)))
    except BaseException:
        # Ctrl-C or a failed shard: start no more shards (finished parts stay for the re-run).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return finish_scoring(plan, results, output_store, time.monotonic() - started,
                          registry_store=registry_store)
