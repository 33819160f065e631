"""Hand-built per-image predictions, for the paired comparison and the gate's paired test:
two models' outcomes on the same images, and registry versions that store them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from flowerml.core.documents import plain
from flowerml.core.files import json_bytes
from flowerml.evaluation.predictions import (
    EvaluationMetrics,
    ImagePrediction,
    PredictionSet,
    encode_predictions,
    predictions_record,
)
from flowerml.registry.versions import ModelVersion, Registry
from tests.helpers.registry_entries import MANIFEST, card, weights

NAMES = ("pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea")


def image_key(index: int, label: int) -> str:
    return f"test/{label:03d}/image_{index + 1:05d}.jpg"


def prediction_set(source: str, outcomes: list[tuple[int, int]], *, manifest: str = MANIFEST,
                   dataset: str = "flowers102@abc", weights_sha256: str = "0" * 64
                   ) -> PredictionSet:
    """One model's predictions: `outcomes[i]` is image i's (true label, predicted label)."""
    rows = []
    for index, (label, predicted) in enumerate(outcomes):
        others = [c for c in range(1, len(NAMES) + 1) if c != predicted]
        rows.append(ImagePrediction(image_key(index, label), label, (predicted, *others),
                                    (0.7, 0.1, 0.1, 0.1)))
    return PredictionSet(source, dataset, manifest, "test", weights_sha256, NAMES, tuple(rows))


def wrong(label: int) -> int:
    return label % len(NAMES) + 1


def paired_outcomes(*, both_right: int, a_only: int, b_only: int, both_wrong: int = 0
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Models a and b on the same images, in four blocks (both right, only a right, only b
    right, both wrong); true labels cycle through the classes so that no class stands out."""
    a: list[tuple[int, int]] = []
    b: list[tuple[int, int]] = []
    blocks = ((both_right, True, True), (a_only, True, False), (b_only, False, True),
              (both_wrong, False, False))
    for count, a_right, b_right in blocks:
        for _ in range(count):
            label = len(a) % len(NAMES) + 1
            a.append((label, label if a_right else wrong(label)))
            b.append((label, label if b_right else wrong(label)))
    return a, b


def top1_of(rows: Sequence[ImagePrediction]) -> float:
    """The share of rows whose best guess is their label."""
    return sum(row.correct for row in rows) / len(rows)


def register_with_predictions(registry: Registry, seed: int,
                              outcomes: list[tuple[int, int]], *,
                              manifest: str = MANIFEST) -> ModelVersion:
    """A version whose card, metrics.json and predictions.jsonl describe `outcomes`, as
    registering an evaluated run stores them."""
    from safetensors.torch import save

    data = save(weights(seed))
    sha = hashlib.sha256(data).hexdigest()
    rows = prediction_set("x", outcomes, manifest=manifest, weights_sha256=sha).images
    encoded = encode_predictions(rows)
    top1 = top1_of(rows)
    metrics = EvaluationMetrics(
        top1=top1, top5=top1, mean_class_accuracy=top1, loss=0.0, n=len(rows),
        predictions=predictions_record(encoded, dataset="flowers102@abc",
                                       manifest_sha256=manifest, split="test",
                                       weights_sha256=sha))
    version_card = {**card(top1, manifest),
                    "classes": [{"label": i + 1, "name": n} for i, n in enumerate(NAMES)],
                    "lineage": {"run_id": f"run-{seed}"}}
    return registry.register(data, version_card, {"metrics.json": json_bytes(plain(metrics)),
                                                  "predictions.jsonl": encoded})
