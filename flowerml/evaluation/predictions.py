"""The per-image predictions an evaluation stores, and reading them back.

Evaluation (`flowerml.evaluation.inference.publish_report`) writes `predictions.jsonl` next to the
metrics: one line per image of the split, in manifest order,

    {"key": "test/001/image_06734.jpg", "label": 1, "top5": [1, 77, 46, 51, 3],
     "probs": [0.9731, 0.0112, 0.0041, 0.0032, 0.0011]}

(1-based labels, most probable first; `top5[0]` is the prediction that top-1 counts), and beside
it `logits.npy`: every image's full logits, float32 [images, classes] in the same order (NumPy's
.npy format, read without pickle), which the ONNX export's parity check compares its graph with
instead of running PyTorch again. metrics.json's `predictions` block records what they were
measured on (dataset version, test manifest sha256, split, weights sha256) and both files' sha256. metrics.json is written last,
so predictions are read only when complete; registration copies both into the version, where
`flowerml.registry.comparison` reads them to compare two models image by image.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flowerml.core.documents import Sha256, StoredDocument
from flowerml.core.errors import UserError
from flowerml.evaluation.drift import Histograms
from flowerml.io.storage import ObjectNotFound, Store
from flowerml.training.runs import RunFiles, check_run_id

if TYPE_CHECKING:
    from flowerml.training.metrics import TopPredictions

PREDICTIONS_FILE = "predictions.jsonl"
LOGITS_FILE = "logits.npy"
METRICS_FILE = "metrics.json"
RUN_PREFIX = "run:"
_PROBABILITY_DIGITS = 6


class ComparisonError(UserError):
    """Predictions that cannot be compared: unreadable, or of different images."""


class PredictionsMissing(ComparisonError):
    """A run or version with no stored per-image predictions (never evaluated, or evaluated
    before evaluation kept them)."""

    kind = "not-found"


@dataclass(frozen=True)
class ImagePrediction:
    """One image: its key under the dataset version, true label, and the most probable labels
    (1-based, best first) with their probabilities."""

    key: str
    label: int
    top: tuple[int, ...]
    probabilities: tuple[float, ...]

    @property
    def predicted(self) -> int:
        return self.top[0]

    @property
    def correct(self) -> bool:
        return self.top[0] == self.label

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "top5": list(self.top),
                "probs": list(self.probabilities)}

    @classmethod
    def from_json(cls, value: Any, where: str) -> ImagePrediction:
        try:
            row = cls(value["key"], value["label"], tuple(value["top5"]), tuple(value["probs"]))
        except (KeyError, TypeError):
            row = None
        if row is None or not row.is_valid():
            raise ComparisonError(f"{where}: not a prediction row: {str(value)[:120]}")
        return row

    def is_valid(self) -> bool:
        return (isinstance(self.key, str) and bool(self.key) and _is_label(self.label)
                and bool(self.top) and len(self.top) == len(self.probabilities)
                and all(_is_label(label) for label in self.top)
                and all(isinstance(p, int | float) and 0 <= p <= 1 for p in self.probabilities))


def _is_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def prediction_rows(keys: Sequence[str], top: TopPredictions) -> list[ImagePrediction]:
    """The rows of one evaluation: `keys[i]` names sample i (the loader's order)."""
    if len(keys) != len(top.targets):
        raise ValueError(f"{len(keys)} image keys for {len(top.targets)} predictions")
    return [ImagePrediction(key, int(label) + 1, tuple(int(c) + 1 for c in classes),
                            tuple(round(float(p), _PROBABILITY_DIGITS) for p in probabilities))
            for key, label, classes, probabilities
            in zip(keys, top.targets, top.classes, top.probabilities, strict=True)]


def encode_predictions(rows: Iterable[ImagePrediction]) -> bytes:
    return "".join(json.dumps(row.to_json(), separators=(",", ":")) + "\n"
                   for row in rows).encode()


def decode_predictions(data: bytes, where: str) -> list[ImagePrediction]:
    rows = []
    for number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise ComparisonError(f"{where}: line {number} is not JSON") from None
        rows.append(ImagePrediction.from_json(value, f"{where}: line {number}"))
    return rows


def encode_logits(logits: np.ndarray) -> bytes:
    """logits.npy's bytes: float32 [images, classes]."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_logits(data: bytes, where: str) -> np.ndarray:
    """logits.npy back as float32 [images, classes] (never unpickled)."""
    try:
        logits = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise ComparisonError(f"{where}: not a .npy array") from None
    if logits.dtype != np.float32 or logits.ndim != 2:
        raise ComparisonError(f"{where}: not float32 [images, classes] logits "
                              f"({logits.dtype} {list(logits.shape)})")
    return logits


class LogitsRecord(StoredDocument):
    """The `logits` block of metrics.json's `predictions`: logits.npy, its sha256, its shape
    and the arithmetic that computed it (`float32`: no autocast, no TF32)."""

    file: str
    sha256: Sha256
    shape: list[int]
    dtype: str
    precision: str


class PredictionsRecord(StoredDocument):
    """metrics.json's `predictions` block: which file, its sha256, and what it measured
    (`dataset` is `<name>@<version>`); `logits` is absent from evaluations made before the full
    logits were kept."""

    file: str
    sha256: Sha256
    dataset: str
    manifest_sha256: Sha256
    split: str
    weights_sha256: Sha256
    logits: LogitsRecord | None = None


class EvaluationMetrics(StoredDocument):
    """`runs/<run_id>/eval/<split>/metrics.json` (and its copy in a registry version): the
    headline numbers, the `predictions` block (absent from evaluations made before the
    per-image predictions were kept) and the `baseline` histograms drift is measured against
    (`flowerml.evaluation.drift`; absent before they were kept: computed from the predictions
    then). Written last: its presence says the evaluation is complete."""

    top1: float
    top5: float
    mean_class_accuracy: float
    loss: float
    n: int
    predictions: PredictionsRecord | None = None
    baseline: Histograms | None = None


def predictions_record(data: bytes, *, dataset: str, manifest_sha256: str, split: str,
                       weights_sha256: str, logits: bytes | None = None,
                       logits_shape: Sequence[int] = (), precision: str = "float32"
                       ) -> PredictionsRecord:
    """metrics.json's `predictions` block of the predictions file `data` (and of logits.npy's
    bytes `logits`, when kept)."""
    kept = {} if logits is None else {"logits": LogitsRecord(
        file=LOGITS_FILE, sha256=hashlib.sha256(logits).hexdigest(),
        shape=[int(n) for n in logits_shape], dtype="float32", precision=precision)}
    return PredictionsRecord(file=PREDICTIONS_FILE, sha256=hashlib.sha256(data).hexdigest(),
                             dataset=dataset, manifest_sha256=manifest_sha256, split=split,
                             weights_sha256=weights_sha256, **kept)


def read_logits(record: PredictionsRecord, read: Any, where: str) -> np.ndarray | None:
    """The logits `record` names, verified against its sha256 and shape, from `read(name) ->
    bytes | None`; None when the evaluation kept none (made before they were kept) or the
    file is absent."""
    if record.logits is None or record.logits.file != LOGITS_FILE:
        return None
    data = read(record.logits.file)
    if data is None:
        return None
    if hashlib.sha256(data).hexdigest() != record.logits.sha256:
        raise ComparisonError(f"{where}/{LOGITS_FILE}: sha256 does not match the one "
                              f"{METRICS_FILE} records")
    logits = decode_logits(data, f"{where}/{LOGITS_FILE}")
    if list(logits.shape) != record.logits.shape:
        raise ComparisonError(f"{where}/{LOGITS_FILE}: shape {list(logits.shape)}, "
                              f"{METRICS_FILE} records {record.logits.shape}")
    return logits


@dataclass(frozen=True)
class PredictionSet:
    """What one model predicted for every image of a split of one manifest."""

    source: str  # "flowers102:000002" or "run:ID"
    dataset: str  # "flowers102@<version>"
    manifest_sha256: str
    split: str
    weights_sha256: str
    class_names: tuple[str, ...]
    images: tuple[ImagePrediction, ...]


def read_prediction_set(metrics: EvaluationMetrics | None, read: Any, *, source: str, where: str,
                        class_names: Sequence[str], fix: str) -> PredictionSet:
    """A PredictionSet from a metrics.json (validated; None when there is none) and
    `read(name) -> bytes | None` for the files beside it; `fix` says what to run when there
    are none."""
    record = metrics.predictions if metrics is not None else None
    if record is None:
        raise PredictionsMissing(f"{source} has no stored per-image predictions (evaluated "
                                 f"before evaluation kept them): {fix}")
    data = read(record.file) if record.file == PREDICTIONS_FILE else None
    if data is None:
        raise PredictionsMissing(f"{source} has no {PREDICTIONS_FILE} beside its metrics: {fix}")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ComparisonError(f"{where}/{PREDICTIONS_FILE}: sha256 does not match the one "
                              f"{METRICS_FILE} records: {fix}")
    rows = decode_predictions(data, f"{where}/{PREDICTIONS_FILE}")
    if not rows:
        raise ComparisonError(f"{where}/{PREDICTIONS_FILE}: holds no predictions: {fix}")
    return PredictionSet(source, record.dataset, record.manifest_sha256, record.split,
                         record.weights_sha256, tuple(class_names), tuple(rows))


def run_predictions(store: Store, run_id: str, split: str = "test") -> PredictionSet:
    """A run's stored predictions on `split` (its latest evaluation there)."""
    run = RunFiles(store, check_run_id(run_id, "run id")).require()
    source = f"{RUN_PREFIX}{run_id}"
    fix = f"run flowerml evaluate --run {run_id}" + (f" --split {split}" if split != "test"
                                                     else "")
    metrics = run.read_optional(f"eval/{split}/{METRICS_FILE}", EvaluationMetrics)
    if metrics is None:
        raise PredictionsMissing(f"{source} has no {split} evaluation: {fix} first")

    def read(name: str) -> bytes | None:
        try:
            return store.get_bytes(run.key(f"eval/{split}/{name}"))
        except ObjectNotFound:
            return None

    classes = run.record().classes
    return read_prediction_set(metrics, read, source=source, fix=fix + " again",
                               where=store.location(run.key(f"eval/{split}")),
                               class_names=classes)
