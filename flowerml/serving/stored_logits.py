"""The logits a version's evaluation kept, as the reference its ONNX parity check compares with.

Registration copies the evaluation's files into the version (`flowerml.registry.release`):
metrics.json names logits.npy by sha256 and says what it was measured on. They stand in for a
second PyTorch pass only when they are about this very model and test split: the same weights
sha256, the card's test manifest, the `test` split, one row per test image and one column per
class, computed in full fp32. Anything else (a version evaluated before the logits were kept,
or on other data) gets `None` and the reason, and the export runs PyTorch again as it always did;
a logits file that fails its checksum is refused, never used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowerml.core.documents import read_document
from flowerml.evaluation.predictions import METRICS_FILE, EvaluationMetrics, read_logits
from flowerml.registry.export_record import ExportError
from flowerml.registry.versions import Registry


class DamagedEvaluation(ExportError):
    """A version's metrics.json that does not read as an evaluation."""


def stored_logits(registry: Registry, version: int, *, weights_sha256: str,
                  card: dict[str, Any], test_images: int
                  ) -> tuple[np.ndarray | None, str | None]:
    """(the version's test logits, None), or (None, why they cannot stand in for PyTorch)."""
    raw = registry.read_attachment(version, METRICS_FILE)
    if raw is None:
        return None, "the version holds no evaluation (metrics.json)"
    where = registry.attachment_key(version, METRICS_FILE)
    metrics = read_document(EvaluationMetrics, raw, where, DamagedEvaluation)
    record = metrics.predictions
    if record is None or record.logits is None:
        return None, "its evaluation kept no logits (evaluated before they were kept)"
    classes = len(card.get("classes") or [])
    mismatch = next((why for failed, why in (
        (record.split != "test", f"its evaluation is of the {record.split} split"),
        (record.weights_sha256 != weights_sha256, "its evaluation is of other weights"),
        (record.manifest_sha256 != card.get("test_manifest_sha256"),
         "its evaluation is of another test manifest than its card's"),
        (record.logits.precision != "float32",
         f"its evaluation's logits were computed in {record.logits.precision}"),
        (record.logits.shape != [test_images, classes],
         f"its logits are {record.logits.shape}, the test split {[test_images, classes]}"),
    ) if failed), None)
    if mismatch:
        return None, mismatch
    logits = read_logits(record, lambda name: registry.read_attachment(version, name),
                         where.rsplit("/", 1)[0])
    if logits is None:
        return None, f"its {record.logits.file} is missing"
    return logits, None
