"""What a finished scoring run says beyond its rows: drift against the version's test baseline,
and the images a person should label (`review.jsonl`).

Both come from one pass over the run's part files when `_SUCCESS.json` is written
(`flowerml.serving.scoring.finish_scoring`), so a run resumed from parts written by another
process counts every image once.

- Drift (`flowerml.evaluation.drift`): the histograms of top-1 probability and of predicted
  class over the scored images, against the version's baseline: metrics.json's `baseline` when
  evaluation stored one, else computed on read from the version's stored per-image test
  predictions (predictions.jsonl, sha256-checked), so a version registered before baselines
  were kept is measured the same way. A version with neither gets no figures, and the record
  says why; scoring itself never fails for it.
- `review.jsonl`, beside the parts when `--review-below P` is given: one row per image whose
  top-1 probability is below P, least sure first (ties in listing order):
  `{"path", "label": null, "key", "probability", "labels", "names", "probabilities"}`.
  `path` is the image's full location (a path or an `s3://` URI) and `label` is for a person
  to fill in (a label number or a class name): the labelled file is a list
  `flowerml ingest --add` reads (`flowerml.data.additions`), which refuses a row still without
  a label, naming its line, rather than guessing. Written create-only, before `_SUCCESS.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flowerml.core.documents import StoredDocument, read_document
from flowerml.core.errors import UserError
from flowerml.evaluation.drift import (
    HistogramCounter,
    Histograms,
    baseline_histograms,
    drift_figures,
)
from flowerml.evaluation.predictions import METRICS_FILE, EvaluationMetrics
from flowerml.io.storage import PreconditionFailed, Store
from flowerml.registry.aliases import DamagedRegistryDocument
from flowerml.registry.comparison import version_predictions
from flowerml.registry.versions import Registry
from flowerml.serving.scoring_plan import ScoringPlan

REVIEW = "review.jsonl"


class ReviewRecord(StoredDocument):
    """`_SUCCESS.json`'s `review` block: where review.jsonl is, its threshold and rows."""

    file: str
    below: float
    images: int


@dataclass
class PartsSummary:
    """One pass over a run's parts: the scored images' counts and the rows to review."""

    counter: HistogramCounter
    review: list[dict[str, Any]] = field(default_factory=list)


def version_baseline(registry: Registry, version: int) -> Histograms:
    """The version's test baseline: stored in its metrics.json, or computed from its stored
    predictions. A version with neither raises `UserError` saying why."""
    raw = registry.read_attachment(version, METRICS_FILE)
    if raw is not None:
        where = registry.store.location(registry.attachment_key(version, METRICS_FILE))
        metrics = read_document(EvaluationMetrics, raw, where, DamagedRegistryDocument)
        if metrics.baseline is not None:
            return metrics.baseline
    predictions = version_predictions(registry, version)
    return baseline_histograms(predictions.images, len(predictions.class_names))


def key_location(root: str, key: str) -> str:
    """Where a listed key's image is: s3:// URIs and absolute paths as they are, relative keys
    under the listing's root."""
    if key.startswith("s3://") or os.path.isabs(key):
        return key
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{key}"
    return os.path.join(root, key)


def part_rows(output_store: Store, plan: ScoringPlan) -> Iterator[dict[str, Any]]:
    for shard in range(plan.shards):
        text = output_store.get_bytes(plan.part_key(shard)).decode()
        yield from (json.loads(line) for line in text.splitlines() if line.strip())


def summarise_parts(output_store: Store, plan: ScoringPlan) -> PartsSummary:
    """The counts of every scored image, and (with `plan.review_below`) the rows of those
    whose top-1 probability is below it, least sure first."""
    counter = HistogramCounter()
    review = []
    for row in part_rows(output_store, plan):
        if "error" in row:
            continue
        top1 = row["probabilities"][0]
        counter.add(row["labels"][0], top1)
        if plan.review_below is not None and top1 < plan.review_below:
            review.append({"path": key_location(plan.root, row["key"]), "label": None,
                           "key": row["key"], "probability": top1, "labels": row["labels"],
                           "names": row["names"], "probabilities": row["probabilities"]})
    review.sort(key=lambda row: row["probability"])  # stable: ties keep listing order
    return PartsSummary(counter, review)


def write_review(output_store: Store, plan: ScoringPlan, rows: list[dict[str, Any]]
                 ) -> ReviewRecord:
    """review.jsonl, create-only (a concurrent finish writes the same rows)."""
    key = plan.key(REVIEW)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    with contextlib.suppress(PreconditionFailed):
        output_store.put_bytes(key, data, if_none_match=True)
    return ReviewRecord(file=output_store.location(key), below=plan.review_below or 0.0,
                        images=len(rows))


def run_figures(plan: ScoringPlan, registry_store: Store, output_store: Store
                ) -> dict[str, Any]:
    """`_SUCCESS.json`'s optional fields: `drift` (or `drift_unavailable`, why not) and
    `review` (when asked for)."""
    summary = summarise_parts(output_store, plan)
    figures: dict[str, Any] = {}
    if plan.review_below is not None:
        figures["review"] = write_review(output_store, plan, summary.review)
    if not summary.counter.images:
        figures["drift_unavailable"] = "no image was scored"
        return figures
    try:
        baseline = version_baseline(Registry(registry_store, plan.model), plan.version)
        scored = summary.counter.histograms(len(baseline.classes))
    except (UserError, ValueError) as error:  # no baseline, or one of other classes
        figures["drift_unavailable"] = str(error)
        return figures
    figures["drift"] = drift_figures(baseline, scored, plan.drift_threshold)
    return figures
