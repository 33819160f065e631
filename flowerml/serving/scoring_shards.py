"""One shard of a `flowerml score` run scored into its part file, and what that part holds.

A shard's keys are read from its key file, decoded a batch ahead on a pool of threads
(`flowerml.serving.inputs.KeyReader`, `flowerml.serving.prediction.image_pixels`) and ranked by the plan's
model, loaded and verified once per process. The part, `part-NNNNN.jsonl` (one row per key, in
listing order: `{"key", "labels", "names", "probabilities"}` or `{"key", "error"}`), is
written whole and create-only: a part that is there already, from an earlier or a concurrent
run, is kept and summarised instead.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flowerml.data.preprocessing import Preprocessing
from flowerml.io.storage import PreconditionFailed, S3Options, Store
from flowerml.registry.versions import Registry
from flowerml.serving.inputs import ImageUnreadable, KeyReader
from flowerml.serving.prediction import ImageError, image_pixels
from flowerml.serving.runtimes import Scorer, load_scorer, softmax_top_k
from flowerml.serving.scoring_plan import ScoringError, ScoringPlan, read_shard

LISTED_FAILURES = 100
"""How many failed rows a shard's result (and `_SUCCESS.json`) names (the parts hold every
one)."""


def load_pixels(reader: KeyReader, key: str,
                preprocessing: Preprocessing | int) -> np.ndarray | str:
    """A key's pixels (the model's `preprocessing`), or why it has none."""
    try:
        return image_pixels(io.BytesIO(reader.read(key)), preprocessing)
    except (ImageUnreadable, ImageError) as error:
        return str(error)


# --------------------------------------------------------------------------------------------
# The model, once per process


_scorers: dict[tuple, Scorer] = {}
_scorers_guard = threading.Lock()


def cached_scorer(registry_store: Store, plan: ScoringPlan, threads: int | None) -> Scorer:
    """The plan's model for this process, loaded (and verified) once; a process keeps one
    model, so a worker that moves on to another version frees the last."""
    key = (registry_store.uri, plan.model, plan.version, plan.runtime, plan.sha256, threads)
    with _scorers_guard:
        if key not in _scorers:
            _scorers.clear()
            _scorers[key] = load_scorer(Registry(registry_store, plan.model), plan.version,
                                        plan.runtime, plan.sha256, threads)
        return _scorers[key]


# --------------------------------------------------------------------------------------------
# Scoring a shard


@dataclass
class ShardResult:
    """What one shard's part holds; `skipped` when an earlier or concurrent run wrote it."""

    shard: int
    images: int
    failed: int
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ShardResult:
        return cls(**value)


def score_rows(scorer: Scorer, reader: KeyReader, keys: list[str], *, batch_size: int,
               top_k: int, decode_threads: int = 2) -> Iterator[dict[str, Any]]:
    """One row per key, in order; the next batch decodes while this one runs."""
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    top_k = min(top_k, len(scorer.class_names))
    with ThreadPoolExecutor(max(decode_threads, 1), thread_name_prefix="flowerml-decode") \
            as pool:
        def decode(batch: list[str]) -> list[Future | np.ndarray | str]:
            if decode_threads < 1:  # everything on this thread (the per-core benchmark)
                return [load_pixels(reader, key, scorer.preprocessing) for key in batch]
            return [pool.submit(load_pixels, reader, key, scorer.preprocessing)
                    for key in batch]

        upcoming = decode(batches[0]) if batches else []
        for index, batch in enumerate(batches):
            current = upcoming
            if index + 1 < len(batches):
                upcoming = decode(batches[index + 1])
            decoded = [item.result() if isinstance(item, Future) else item for item in current]
            yield from ranked_rows(scorer, batch, decoded, top_k)


def ranked_rows(scorer: Scorer, keys: list[str], decoded: list[np.ndarray | str],
                top_k: int) -> Iterator[dict[str, Any]]:
    images = [d for d in decoded if isinstance(d, np.ndarray)]
    ranked = iter(top_k_rows(scorer, np.stack(images), top_k) if images else [])
    for key, item in zip(keys, decoded, strict=True):
        yield {"key": key, **next(ranked)} if isinstance(item, np.ndarray) else \
            {"key": key, "error": item}


def top_k_rows(scorer: Scorer, pixels: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    return [{"labels": [i + 1 for i in indices],
             "names": [scorer.class_names[i] for i in indices],
             "probabilities": [round(p, 6) for p in probabilities]}
            for indices, probabilities in softmax_top_k(scorer, pixels, top_k)]


def score_shard(plan: ScoringPlan, shard: int, *, registry_store: Store, output_store: Store,
                s3: S3Options | None = None, threads: int | None = None,
                decode_threads: int = 2) -> ShardResult:
    """Score one shard into its part, unless a part is there already."""
    if not 0 <= shard < plan.shards:
        raise ScoringError(f"shard {shard} is outside 0-{plan.shards - 1}")
    part = plan.part_key(shard)
    if output_store.exists(part):
        return summarise_part(output_store, plan, shard)
    started = time.perf_counter()
    keys = read_shard(output_store, plan, shard)
    scorer = cached_scorer(registry_store, plan, threads)
    rows = list(score_rows(scorer, KeyReader(plan.root, s3), keys, batch_size=plan.batch_size,
                           top_k=plan.top_k, decode_threads=decode_threads))
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    try:
        output_store.put_bytes(part, data, if_none_match=True)
    except PreconditionFailed:  # a concurrent run finished this shard first: keep its part
        return summarise_part(output_store, plan, shard)
    return shard_result(shard, rows, time.perf_counter() - started)


def shard_result(shard: int, rows: Iterable[dict[str, Any]], seconds: float = 0.0,
                 skipped: bool = False) -> ShardResult:
    images, failures = 0, []
    for row in rows:
        images += 1
        if "error" in row:
            failures.append({"key": row["key"], "error": row["error"]})
    return ShardResult(shard, images, len(failures), failures[:LISTED_FAILURES], skipped,
                       round(seconds, 3))


def summarise_part(output_store: Store, plan: ScoringPlan, shard: int) -> ShardResult:
    text = output_store.get_bytes(plan.part_key(shard)).decode()
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return shard_result(shard, rows, skipped=True)
