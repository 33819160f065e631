"""Metrics against hand-computed values, batch accumulation, the report and its plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowerml.evaluation import (
    ClassAccuracy,
    ConfusedPair,
    Metrics,
    MetricsAccumulator,
    compute_metrics,
    per_class_rows,
    plot_confusion_matrix,
    plot_training_curves,
    render_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"]

# Six samples, four classes; "sweet pea" (index 3) is predicted once but has no samples.
#   sample  target  logits          predicted
#   0       0       [2, 0, 0, 0]    0  right
#   1       0       [0, 3, 0, 0]    1  wrong
#   2       0       [0, 1, 0, 0]    1  wrong
#   3       1       [0, 2, 0, 0]    1  right
#   4       1       [0, 0, 1, 0]    2  wrong
#   5       2       [0, 0, 0, 4]    3  wrong
LOGITS = torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 1.0, 0, 0], [0, 2.0, 0, 0],
                       [0, 0, 1.0, 0], [0, 0, 0, 4.0]])
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2])


def hand_loss() -> float:
    """-log softmax of the target per row: log(sum exp) - target logit, each row by hand."""
    e = math.e
    per_sample = [math.log(e**2 + 3) - 2, math.log(e**3 + 3), math.log(e + 3),
                  math.log(e**2 + 3) - 2, math.log(e + 3), math.log(e**4 + 3)]
    return sum(per_sample) / 6


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


def test_report_names_flowers_formats_numbers_and_links_plots(metrics: Metrics) -> None:
    report = render_report(
        metrics, title="Evaluation of resnet152 v7",
        context={"run id": "run-42", "dataset version": "ab12cd", "split": "test"},
        plots={"Confusion matrix": "plots/confusion.png", "Training curves": "curves.png"})
    assert report.startswith("# Evaluation of resnet152 v7\n")
    assert "| **run id** | run-42 |" in report
    assert "| **dataset version** | ab12cd |" in report
    assert "| top-1 accuracy | 33.33% |" in report
    assert "| top-5 accuracy | 100.00% |" in report
    assert "| mean per-class accuracy | 27.78% |" in report
    assert f"| loss (cross-entropy) | {hand_loss():.4f} |" in report
    assert "| samples | 6 |" in report
    assert "| pink primrose (1) | hard-leaved pocket orchid (2) | 2 |" in report
    assert "![Confusion matrix](plots/confusion.png)" in report
    assert "![Training curves](curves.png)" in report
    worst = report.split("## Worst classes")[1].split("##")[0]
    # Worst first; a class without samples is not among the worst.
    assert worst.index("canterbury bells") < worst.index("pink primrose") < worst.index(
        "hard-leaved pocket orchid")
    assert "sweet pea" not in worst
    full = report.split("## Per-class accuracy")[1]
    assert "| 1 | pink primrose | 33.33% | 3 |" in full
    assert "| 4 | sweet pea | n/a | 0 |" in full


def test_report_keeps_pipes_inside_cells(metrics: Metrics) -> None:
    report = render_report(metrics, title="t", context={"note": "a|b"})
    assert "| **note** | a\\|b |" in report


def test_report_on_synthetic_data_says_so_under_the_title(metrics: Metrics) -> None:
    synthetic = render_report(metrics, title="t", synthetic=True)
    title, notice = synthetic.split("\n\n")[:2]
    assert title == "# t"
    assert notice.startswith("> **Synthetic data.**") and "not photographed" in notice
    assert "Synthetic" not in render_report(metrics, title="t")  # real data: no notice


def assert_png(path: Path, min_size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_confusion_matrix_plots_small_and_102_classes(metrics: Metrics, tmp_path: Path) -> None:
    small = plot_confusion_matrix(metrics, tmp_path / "plots" / "small.png")
    assert small == tmp_path / "plots" / "small.png"
    assert_png(small, (400, 400))
    generator = torch.Generator().manual_seed(1)
    targets = torch.arange(102).repeat(3)
    logits = torch.randn(306, 102, generator=generator)
    logits[torch.arange(306), targets] += 2
    big = compute_metrics(logits, targets, [f"flower {i}" for i in range(102)])
    assert_png(plot_confusion_matrix(big, tmp_path / "big.png"), (800, 800))


def test_training_curves_plot_tolerates_missing_keys(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 2.1, "valid_loss": 1.9, "valid_top1": 0.41, "lr": 1e-3},
        {"epoch": 2, "train_loss": 1.2, "lr": 5e-4},
        {"epoch": 3, "train_loss": 0.8, "valid_loss": None, "valid_top1": 0.73},
        {"train_loss": 0.7, "valid_top1": np.float32(0.75)},
    ]
    assert_png(plot_training_curves(history, tmp_path / "curves.png"), (600, 300))
    assert_png(plot_training_curves([], tmp_path / "empty.png"), (600, 300))


@pytest.mark.slow  # a child Python process
def test_import_is_cheap_and_free_of_prefect_and_pyplot() -> None:
    code = ("import sys, flowerml.evaluation; "
            "print(sorted(m for m in ('prefect', 'matplotlib', 'matplotlib.pyplot') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


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
