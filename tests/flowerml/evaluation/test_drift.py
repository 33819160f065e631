"""flowerml.evaluation.drift: the histograms of a set of predictions, the population stability
index against hand-computed values, and the verdict at a threshold."""

from __future__ import annotations

import pytest

from flowerml.evaluation.drift import (
    CONFIDENCE_BINS,
    EMPTY_BIN_SHARE,
    Histograms,
    baseline_histograms,
    confidence_bin,
    drift_figures,
    histograms_of,
    population_stability_index,
)
from flowerml.evaluation.predictions import ImagePrediction


def test_identical_shares_give_zero() -> None:
    assert population_stability_index([5, 10, 0, 85], [5, 10, 0, 85]) == 0.0
    # the shares count, not the sizes: ten times the images, the same population
    assert population_stability_index([1, 2, 7], [10, 20, 70]) == pytest.approx(0.0, abs=1e-12)


def test_a_shifted_population_against_hand_computed_values() -> None:
    # halves against a quarter and three quarters: 0.25 ln 2 + 0.25 ln 1.5
    assert population_stability_index([50, 50], [25, 75]) == pytest.approx(0.274653, abs=1e-6)
    # ten bins of 10 % against all in the last: 0.9 ln 10 (the last) + 9 x (1e-4 - 0.1) ln(1e-3)
    uniform, last = [10] * 10, [0] * 9 + [30]
    assert population_stability_index(uniform, last) == pytest.approx(
        0.9 * 2.302585 + 9 * 0.0999 * 6.907755, abs=1e-5)
    assert population_stability_index(uniform, last) > 5  # far above any threshold


def test_an_empty_bin_counts_as_a_small_share_so_the_index_stays_finite() -> None:
    # [1, 0] against [0.5, 0.5]: the empty baseline bin counts as EMPTY_BIN_SHARE
    assert EMPTY_BIN_SHARE == 1e-4
    assert population_stability_index([10, 0], [5, 5]) == pytest.approx(
        (0.5 - 1) * -0.693147 + (0.5 - 1e-4) * 8.517193, abs=1e-5)


def test_histograms_that_cannot_be_compared_are_refused() -> None:
    with pytest.raises(ValueError, match="histograms of 2 and 3 bins"):
        population_stability_index([1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="without counts"):
        population_stability_index([0, 0], [1, 1])


def test_top1_probabilities_fall_in_ten_equal_bins_the_last_closed() -> None:
    assert CONFIDENCE_BINS == 10
    assert [confidence_bin(p) for p in (0.0, 0.05, 0.1, 0.55, 0.999, 1.0)] == [0, 0, 1, 5, 9, 9]
    found = histograms_of([(1, 0.95), (3, 0.31), (3, 1.0), (2, 0.12)], classes=4)
    assert found == Histograms(images=4, confidence=[0, 1, 0, 1, 0, 0, 0, 0, 0, 2],
                               classes=[1, 1, 2, 0])
    with pytest.raises(ValueError, match="label 5 is outside 1..4"):
        histograms_of([(5, 0.5)], classes=4)


def test_the_baseline_counts_each_stored_prediction_s_top1() -> None:
    rows = [ImagePrediction("test/001/a.jpg", 1, (2, 1), (0.7, 0.2)),
            ImagePrediction("test/002/b.jpg", 2, (2, 1), (0.45, 0.4))]
    assert baseline_histograms(rows, classes=3) == Histograms(
        images=2, confidence=[0, 0, 0, 0, 1, 0, 0, 1, 0, 0], classes=[0, 2, 0])


def test_the_verdict_is_drift_when_either_index_is_above_the_threshold() -> None:
    baseline = Histograms(images=4, confidence=[0] * 8 + [2, 2], classes=[2, 2])
    same = drift_figures(baseline, baseline, threshold=0.2)
    assert (same.psi_confidence, same.psi_classes, same.drifted) == (0.0, 0.0, False)
    other_classes = Histograms(images=4, confidence=[0] * 8 + [2, 2], classes=[1, 3])
    shifted = drift_figures(baseline, other_classes, threshold=0.2)
    assert shifted.psi_confidence == 0.0
    assert shifted.psi_classes == pytest.approx(0.274653, abs=1e-6)
    assert shifted.drifted
    assert not drift_figures(baseline, other_classes, threshold=0.3).drifted
