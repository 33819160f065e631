"""The evaluation report and its plots, on the six hand-checked samples' metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowerml.evaluation.report import (
    plot_confusion_matrix,
    plot_training_curves,
    render_report,
)
from flowerml.training.metrics import Metrics, compute_metrics
from tests.helpers.six_samples import LOGITS, NAMES, TARGETS, hand_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return compute_metrics(LOGITS, TARGETS, NAMES)


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
    code = ("import sys, flowerml.evaluation.report; "
            "print(sorted(m for m in ('prefect', 'matplotlib', 'matplotlib.pyplot') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"
