"""Metrics against hand-computed values, batch accumulation, and each sample's top classes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowerml.training.metrics import (
    ClassAccuracy,
    ConfusedPair,
    Metrics,
    MetricsAccumulator,
    compute_metrics,
    per_class_rows,
)
from tests.helpers.six_samples import LOGITS, NAMES, TARGETS, hand_loss


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return compute_metrics(LOGITS, TARGETS, NAMES)


def test_headline_metrics_match_hand_computed_values(metrics: Metrics) -> None:
    assert metrics.n == 6
    assert metrics.top1 == pytest.approx(2 / 6)
    # k = min(5, 4) = 4 classes, so every sample is a top-k hit.
    assert metrics.top5 == 1.0
    assert metrics.loss == pytest.approx(hand_loss(), rel=1e-6)
    # Mean over the three classes with samples; "sweet pea" has none and is skipped.
    assert metrics.mean_class_accuracy == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert metrics.summary() == {"top1": pytest.approx(1 / 3), "top5": 1.0,
                                 "mean_class_accuracy": pytest.approx(5 / 18),
                                 "loss": pytest.approx(hand_loss(), rel=1e-6), "n": 6}
    summary = metrics.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert type(summary["n"]) is int and all(
        type(summary[k]) is float for k in ("top1", "top5", "mean_class_accuracy", "loss"))


def test_per_class_accuracy_and_confusion_cells(metrics: Metrics) -> None:
    assert metrics.per_class == [
        ClassAccuracy(label=1, name="pink primrose", accuracy=pytest.approx(1 / 3), support=3),
        ClassAccuracy(label=2, name="hard-leaved pocket orchid", accuracy=0.5, support=2),
        ClassAccuracy(label=3, name="canterbury bells", accuracy=0.0, support=1),
        ClassAccuracy(label=4, name="sweet pea", accuracy=0.0, support=0),
    ]
    expected = np.array([[1, 2, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert metrics.confusion.dtype == np.int64
    np.testing.assert_array_equal(metrics.confusion, expected)
    assert per_class_rows(metrics)[1] == {"label": 2, "name": "hard-leaved pocket orchid",
                                          "accuracy": 0.5, "support": 2}


def test_most_confused_pairs_by_count_then_label(metrics: Metrics) -> None:
    assert metrics.most_confused == [
        ConfusedPair(1, "pink primrose", 2, "hard-leaved pocket orchid", 2),
        ConfusedPair(2, "hard-leaved pocket orchid", 3, "canterbury bells", 1),
        ConfusedPair(3, "canterbury bells", 4, "sweet pea", 1),
    ]


def test_most_confused_keeps_at_most_ten() -> None:
    # 12 classes, each sample predicted as the next class: 12 distinct off-diagonal cells.
    targets = torch.arange(12)
    logits = torch.nn.functional.one_hot((targets + 1) % 12, 12).float()
    metrics = compute_metrics(logits, targets, [f"c{i}" for i in range(12)])
    assert metrics.top1 == 0.0
    assert [(p.true_label, p.predicted_label) for p in metrics.most_confused] == [
        (i, i + 1) for i in range(1, 11)]


def test_top5_counts_a_target_ranked_fifth_but_not_sixth() -> None:
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]]).repeat(4, 1)
    targets = torch.tensor([0, 4, 5, 6])  # ranks 1, 5, 6, 7
    metrics = compute_metrics(logits, targets, [f"c{i}" for i in range(7)])
    assert metrics.top1 == 0.25
    assert metrics.top5 == 0.5


def test_accumulating_batches_equals_computing_at_once() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(53, 9, generator=generator) * 3
    targets = torch.randint(0, 8, (53,), generator=generator)  # class 9 has no samples
    names = [f"flower {i}" for i in range(9)]
    accumulator = MetricsAccumulator(9)
    for start in range(0, 53, 7):  # uneven last batch
        accumulator.update(logits[start:start + 7], targets[start:start + 7].int())
    accumulator.update(logits[:0], targets[:0])  # an empty batch changes nothing
    batched = accumulator.result(names)
    at_once = compute_metrics(logits, targets, names)
    assert batched.loss == pytest.approx(at_once.loss, rel=1e-9)
    same_loss = Metrics(**{**batched.__dict__, "loss": at_once.loss})
    assert same_loss == at_once
    assert at_once.n == 53 and len(at_once.per_class) == 9
    assert at_once.per_class[8].support == 0


def test_low_precision_logits_are_accepted() -> None:
    metrics = compute_metrics(LOGITS.to(torch.bfloat16), TARGETS, NAMES)
    assert metrics.top1 == pytest.approx(2 / 6)
    assert metrics.loss == pytest.approx(hand_loss(), rel=1e-2)


@pytest.mark.parametrize("logits, targets, names, message", [
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), NAMES, "no samples"),
    (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), NAMES, "targets must be"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), NAMES, "logits must be"),
    (torch.zeros(2, 4), torch.tensor([0, 4]), NAMES, r"\[0, 4\)"),
    (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), NAMES, "integer"),
    (torch.zeros(2, 4), torch.tensor([0, 1]), NAMES[:3], "3 class names"),
])
def test_bad_input_raises_value_error(logits: torch.Tensor, targets: torch.Tensor,
                                      names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(logits, targets, names)


def test_empty_accumulator_and_wrong_width_raise_value_error() -> None:
    accumulator = MetricsAccumulator(4)
    with pytest.raises(ValueError, match="empty"):
        accumulator.result(NAMES)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        accumulator.update(torch.zeros(2, 5), torch.tensor([0, 1]))


def test_each_samples_top_classes_and_probabilities_are_kept(metrics: Metrics) -> None:
    top = metrics.predictions
    assert top.classes.shape == (6, 4) and top.probabilities.shape == (6, 4)
    assert top.predicted.tolist() == [0, 1, 1, 1, 2, 3]  # the table above
    assert top.targets.tolist() == TARGETS.tolist()
    softmax = torch.softmax(LOGITS, dim=1).numpy()
    for row in range(6):
        assert sorted(top.classes[row].tolist()) == [0, 1, 2, 3]
        assert np.allclose(top.probabilities[row], softmax[row, top.classes[row]])
    assert top.probabilities[5, 0] == pytest.approx(math.e**4 / (math.e**4 + 3))


def test_a_tie_puts_the_argmax_first_so_top1_and_the_stored_prediction_agree() -> None:
    logits = torch.zeros(2, 7)  # every class equally likely: argmax picks one, topk may not
    logits[1, 3] = logits[1, 5] = 1.0
    metrics = compute_metrics(logits, torch.tensor([0, 5]), [f"c{i}" for i in range(7)])
    top = metrics.predictions
    assert top.classes.shape == (2, 5)
    assert top.predicted.tolist() == logits.argmax(dim=1).tolist()
    assert metrics.top1 == float(np.mean(top.predicted == top.targets))
    assert len(set(top.classes[0].tolist())) == 5
