"""Drift between what a model saw when it was tested and what it sees in service.

Two histograms describe a set of predictions (`Histograms`): how sure the model was (its top-1
probability, counted in `CONFIDENCE_BINS` equal bins on [0, 1], the last one closed) and what
it predicted (one count per class, label 1 first). Evaluation stores them for the test split
as the model's baseline (metrics.json's `baseline`); scoring computes the same for the images
it scored, and the population stability index (PSI) of each against the baseline:

    PSI = sum over bins of (scored share - baseline share) * ln(scored share / baseline share)

A bin empty on one side counts as `EMPTY_BIN_SHARE`, so the logarithm stays finite (an empty
bin facing a full one still weighs heavily, as it should). The usual reading: below 0.1 the
population is stable, 0.1 to 0.2 it moved, above 0.2 (`DEFAULT_DRIFT_THRESHOLD`) it drifted.
Pure functions: nothing here reads or writes a store.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

from flowerml.core.documents import StoredDocument

CONFIDENCE_BINS = 10
EMPTY_BIN_SHARE = 1e-4
DEFAULT_DRIFT_THRESHOLD = 0.2


class Histograms(StoredDocument):
    """Counts over a set of predictions: `confidence[i]` images had a top-1 probability in
    [i/10, (i+1)/10) (the last bin takes 1.0); `classes[c]` images were predicted label c+1."""

    images: int
    confidence: list[int]
    classes: list[int]


class Prediction(Protocol):
    """An image's stored prediction (`flowerml.evaluation.predictions.ImagePrediction`, which
    is not imported: that module stores the baseline)."""

    @property
    def predicted(self) -> int: ...

    @property
    def probabilities(self) -> tuple[float, ...]: ...


class DriftFigures(StoredDocument):
    """The scored images' histograms, the baseline's, the PSI of each pair, and the verdict
    at `threshold` (drifted: either PSI above it)."""

    scored: Histograms
    baseline: Histograms
    psi_confidence: float
    psi_classes: float
    threshold: float
    drifted: bool


def confidence_bin(probability: float) -> int:
    """The bin of a top-1 probability (1.0 falls in the last bin, not past it)."""
    return min(max(int(probability * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


class HistogramCounter:
    """Histograms built one prediction at a time (scoring streams its part files); the number
    of classes is given at the end."""

    def __init__(self) -> None:
        self.confidence = [0] * CONFIDENCE_BINS
        self.labels: Counter[int] = Counter()

    def add(self, label: int, probability: float) -> None:
        """One image: its predicted label (1-based) and top-1 probability."""
        self.confidence[confidence_bin(probability)] += 1
        self.labels[label] += 1

    @property
    def images(self) -> int:
        return sum(self.confidence)

    def histograms(self, classes: int) -> Histograms:
        outside = sorted(label for label in self.labels if not 1 <= label <= classes)
        if outside:
            raise ValueError(f"label {outside[0]} is outside 1..{classes}")
        return Histograms(images=self.images, confidence=list(self.confidence),
                          classes=[self.labels[label] for label in range(1, classes + 1)])


def histograms_of(top1: Iterable[tuple[int, float]], classes: int) -> Histograms:
    """Histograms of (predicted label, top-1 probability) pairs over `classes` classes."""
    counter = HistogramCounter()
    for label, probability in top1:
        counter.add(label, probability)
    return counter.histograms(classes)


def baseline_histograms(predictions: Iterable[Prediction], classes: int) -> Histograms:
    """A model's baseline: the histograms of its stored per-image test predictions."""
    return histograms_of(((row.predicted, row.probabilities[0]) for row in predictions), classes)


def population_stability_index(baseline: Sequence[int], scored: Sequence[int],
                               empty_bin_share: float = EMPTY_BIN_SHARE) -> float:
    """PSI of two histograms of the same bins, from their counts (see the module's docstring).
    Identical shares give 0; it grows without bound as the shares part."""
    if len(baseline) != len(scored):
        raise ValueError(f"histograms of {len(baseline)} and {len(scored)} bins")
    if not sum(baseline) or not sum(scored):
        raise ValueError("a histogram without counts has no shares")
    total = 0.0
    for expected, actual in zip(shares(baseline, empty_bin_share),
                                shares(scored, empty_bin_share), strict=True):
        total += (actual - expected) * math.log(actual / expected)
    return total


def shares(counts: Sequence[int], empty_bin_share: float) -> list[float]:
    whole = sum(counts)
    return [count / whole if count else empty_bin_share for count in counts]


def drift_figures(baseline: Histograms, scored: Histograms, threshold: float) -> DriftFigures:
    """The PSI of both histograms against the baseline, and whether either is above
    `threshold`. Both must count images, over the same classes."""
    psi_confidence = population_stability_index(baseline.confidence, scored.confidence)
    psi_classes = population_stability_index(baseline.classes, scored.classes)
    return DriftFigures(scored=scored, baseline=baseline,
                        psi_confidence=round(psi_confidence, 6),
                        psi_classes=round(psi_classes, 6), threshold=threshold,
                        drifted=max(psi_confidence, psi_classes) > threshold)
