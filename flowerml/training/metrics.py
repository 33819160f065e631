"""A classifier's metrics: mean cross-entropy, top-1, top-5, mean per-class accuracy, the
confusion matrix and its most-confused pairs, computed either at once (`compute_metrics`) or batch
by batch without keeping the logits (`MetricsAccumulator`); both go through the same code, so they
agree. Each sample's five most probable classes and their probabilities are kept too
(`TopPredictions`, a few numbers per sample): evaluation stores them so that two models can be
compared image by image later (`flowerml.evaluation.predictions`). Training measures each epoch's
validation with these; evaluation reports them (`flowerml.evaluation.report`).

Indices are 0-based inside tensors; everything a person reads uses 1-based labels (class dir
"001" is label 1, class index 0), as in the published dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TOP_K = 5
MOST_CONFUSED_LIMIT = 10


@dataclass(frozen=True)
class ClassAccuracy:
    """Accuracy on one class. A class with no samples has accuracy 0.0 (never NaN)."""

    label: int
    name: str
    accuracy: float
    support: int


@dataclass(frozen=True)
class ConfusedPair:
    """How many samples of one class were predicted as another."""

    true_label: int
    true_name: str
    predicted_label: int
    predicted_name: str
    count: int


@dataclass(frozen=True, eq=False)
class TopPredictions:
    """Per sample, in the order evaluated: the k most probable classes (0-based indices, the
    first being the argmax that top-1 and the confusion matrix count), their softmax
    probabilities, and the true class."""

    classes: np.ndarray  # [N, k] int64
    probabilities: np.ndarray  # [N, k] float32
    targets: np.ndarray  # [N] int64

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TopPredictions):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f))
                   for f in ("classes", "probabilities", "targets"))

    __hash__ = None  # type: ignore[assignment]

    @property
    def predicted(self) -> np.ndarray:
        """The top-1 class index of each sample."""
        return self.classes[:, 0]


@dataclass(frozen=True)
class Metrics:
    """The metrics of one evaluation. `confusion` rows are true classes, columns predictions;
    `predictions` holds each sample's top classes (None only where a caller built the record
    by hand)."""

    n: int
    loss: float
    top1: float
    top5: float
    mean_class_accuracy: float
    per_class: list[ClassAccuracy]
    confusion: np.ndarray
    most_confused: list[ConfusedPair]
    predictions: TopPredictions | None = None

    # The generated __eq__ would compare the arrays with `==` and fail on their truth value.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Metrics):
            return NotImplemented
        scalars = ("n", "loss", "top1", "top5", "mean_class_accuracy", "per_class",
                   "most_confused", "predictions")
        return all(getattr(self, f) == getattr(other, f) for f in scalars) and bool(
            np.array_equal(self.confusion, other.confusion))

    # Holds a list and an array, so it cannot be hashed; say so instead of failing later.
    __hash__ = None  # type: ignore[assignment]

    def summary(self) -> dict[str, Any]:
        """The headline numbers as plain floats and an int, ready for JSON."""
        return {
            "top1": float(self.top1),
            "top5": float(self.top5),
            "mean_class_accuracy": float(self.mean_class_accuracy),
            "loss": float(self.loss),
            "n": int(self.n),
        }


class MetricsAccumulator:
    """Accumulates over batches without keeping all logits: running loss sum, top1/top5 correct,
    confusion, and each sample's top-k classes with their probabilities.

    `update` accepts tensors on any device; only per-sample results (a dozen numbers per
    sample, never the C logits) are copied to the CPU.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.k = min(TOP_K, num_classes)
        self.n = 0
        self.loss_sum = 0.0
        self.topk_correct = 0
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._top: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: logits [B, C] (any float dtype), targets [B] of 0-based class indices."""
        targets_cpu = _checked_targets(logits, targets, self.num_classes)
        if targets_cpu.numel() == 0:
            return
        with torch.no_grad():
            losses, top, probabilities = _batch_results(logits, targets_cpu, self.k)
        preds = top[:, 0]
        # Summed in float64 so the total over thousands of batches does not drift.
        self.loss_sum += float(losses.to(torch.float64).sum())
        self.topk_correct += int((top == targets_cpu[:, None]).any(dim=1).sum())
        self._top.append((top.numpy(), probabilities.numpy(), targets_cpu.numpy()))
        cells = torch.bincount(targets_cpu * self.num_classes + preds,
                               minlength=self.num_classes**2)
        self.confusion += cells.reshape(self.num_classes, self.num_classes).numpy()
        self.n += int(targets_cpu.numel())

    def result(self, class_names: Sequence[str]) -> Metrics:
        """The metrics of everything added so far; `class_names[i]` names class index i."""
        if self.n == 0:
            raise ValueError("no samples to evaluate: the accumulator is empty")
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for "
                             f"{self.num_classes} classes")
        classes, probabilities, targets = (np.concatenate(parts) for parts in zip(*self._top,
                                                                                  strict=True))
        for array in (classes, probabilities, targets):
            array.setflags(write=False)  # a frozen record, like the confusion matrix
        predictions = TopPredictions(classes, probabilities, targets)
        return _build_metrics(self.n, self.loss_sum, self.topk_correct, self.confusion.copy(),
                              list(class_names), predictions)


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor,
                    class_names: Sequence[str]) -> Metrics:
    """Metrics of logits [N, C] against targets [N] (0-based; index i is label i+1)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples to evaluate: logits are empty")
    accumulator = MetricsAccumulator(logits.shape[1])
    accumulator.update(logits, targets)
    return accumulator.result(class_names)


def _checked_targets(logits: torch.Tensor, targets: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """Validate a batch and return its targets as a CPU int64 tensor."""
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [N, {num_classes}], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be [{logits.shape[0]}] to match the logits, "
                         f"got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    targets_cpu = targets.detach().to("cpu", torch.int64)
    # Checked here, before cross_entropy: on CUDA an out-of-range target is a device-side
    # assert that poisons the whole process instead of a catchable error.
    if targets_cpu.numel() and (targets_cpu.min() < 0 or targets_cpu.max() >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got values "
                         f"from {int(targets_cpu.min())} to {int(targets_cpu.max())}")
    return targets_cpu


def _batch_results(logits: torch.Tensor, targets_cpu: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss, top-k classes ([B, k], the argmax first) and their probabilities,
    computed on the logits' device, moved to CPU."""
    # float32 at least: half/bfloat16 logits (autocast) lose too much in log-softmax.
    scores = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets_cpu.to(scores.device)
    losses = F.cross_entropy(scores, targets, reduction="none")
    preds = scores.argmax(dim=1, keepdim=True)
    # topk and argmax may break ties differently: the argmax comes first, then the k-1 best of
    # the rest, so that top-1, the confusion matrix and the stored predictions always agree
    # (and a top-1 hit is a top-k hit).
    rest = scores.scatter(1, preds, float("-inf")).topk(k - 1, dim=1).indices
    top = torch.cat([preds, rest], dim=1)
    probabilities = scores.softmax(dim=1).gather(1, top)
    return losses.cpu(), top.cpu(), probabilities.float().cpu()


def _build_metrics(n: int, loss_sum: float, topk_correct: int, confusion: np.ndarray,
                   names: list[str], predictions: TopPredictions) -> Metrics:
    per_class = _per_class(confusion, names)
    supported = [c.accuracy for c in per_class if c.support > 0]
    confusion.setflags(write=False)  # Metrics is a frozen record; so is its matrix.
    return Metrics(
        n=n,
        loss=loss_sum / n,
        # The diagonal is the single source of truth for top-1, so it matches per_class.
        top1=int(np.trace(confusion)) / n,
        top5=topk_correct / n,
        mean_class_accuracy=sum(supported) / len(supported),
        per_class=per_class,
        confusion=confusion,
        most_confused=_most_confused(confusion, names, MOST_CONFUSED_LIMIT),
        predictions=predictions,
    )


def _per_class(confusion: np.ndarray, names: list[str]) -> list[ClassAccuracy]:
    rows = []
    for i, name in enumerate(names):
        support = int(confusion[i].sum())
        accuracy = int(confusion[i, i]) / support if support else 0.0
        rows.append(ClassAccuracy(label=i + 1, name=name, accuracy=accuracy, support=support))
    return rows


def _most_confused(confusion: np.ndarray, names: list[str], limit: int) -> list[ConfusedPair]:
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    true_idx, pred_idx = np.nonzero(off_diagonal)
    cells = sorted(zip(true_idx.tolist(), pred_idx.tolist(), strict=True),
                   key=lambda cell: (-int(off_diagonal[cell]), cell[0], cell[1]))
    return [ConfusedPair(true_label=t + 1, true_name=names[t], predicted_label=p + 1,
                         predicted_name=names[p], count=int(off_diagonal[t, p]))
            for t, p in cells[:limit]]


def per_class_rows(metrics: Metrics) -> list[dict[str, Any]]:
    """One plain dict per class (label, name, accuracy, support), for a table artifact."""
    return [{"label": c.label, "name": c.name, "accuracy": c.accuracy, "support": c.support}
            for c in metrics.per_class]
