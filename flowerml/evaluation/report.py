"""The evaluation report: a model's metrics (`flowerml.training.metrics`) in Markdown
(`render_report`, `per_class_rows`) and its PNG plots (`plot_confusion_matrix`,
`plot_training_curves`).

Plots are drawn on a bare `matplotlib.figure.Figure`, never through pyplot: nothing here selects
or needs a display backend, changes matplotlib's global backend for the caller, or leaves figures
registered in pyplot's global state. matplotlib is imported only when a plot is drawn, so
importing this module stays cheap.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowerml.core.markdown import cell, table
from flowerml.training.metrics import MOST_CONFUSED_LIMIT, ClassAccuracy, Metrics

WORST_CLASSES_LIMIT = 10
# Above this many classes a confusion matrix cell is a few pixels wide: per-cell counts and
# per-class names on the axes would be unreadable, so they are left out.
CELL_TEXT_MAX_CLASSES = 20

SYNTHETIC_NOTICE = (
    "> **Synthetic data.** The images behind these numbers were drawn by `flowerml synth`, not "
    "photographed: they show that the pipeline works, not how well a model recognises real "
    "flowers, and the class names are only labels.")


def render_report(metrics: Metrics, *, title: str, context: dict[str, str] | None = None,
                  plots: dict[str, str] | None = None, synthetic: bool = False) -> str:
    """The evaluation report in Markdown; `plots` maps a caption to a relative image path;
    `synthetic` puts a notice under the title that the data was drawn, not photographed."""
    sections = [f"# {cell(title)}"]
    if synthetic:
        sections.append(SYNTHETIC_NOTICE)
    if context:
        sections.append(table(["context", "value"], [[f"**{k}**", str(v)]
                                                      for k, v in context.items()]))
    sections += [_headline_section(metrics), _confused_section(metrics),
                 _worst_section(metrics)]
    if plots:
        sections.append("## Plots\n\n" + "\n\n".join(
            f"![{caption}]({_link(path)})" for caption, path in plots.items()))
    sections.append(_per_class_section(metrics))
    return "\n\n".join(sections) + "\n"


def _headline_section(metrics: Metrics) -> str:
    rows = [["top-1 accuracy", _pct(metrics.top1)],
            ["top-5 accuracy", _pct(metrics.top5)],
            ["mean per-class accuracy", _pct(metrics.mean_class_accuracy)],
            ["loss (cross-entropy)", f"{metrics.loss:.4f}"],
            ["samples", f"{metrics.n:,}"]]
    return "## Results\n\n" + table(["metric", "value"], rows)


def _confused_section(metrics: Metrics) -> str:
    heading = f"## Most confused pairs (top {MOST_CONFUSED_LIMIT})"
    if not metrics.most_confused:
        return f"{heading}\n\nNo sample was misclassified."
    rows = [[f"{p.true_name} ({p.true_label})", f"{p.predicted_name} ({p.predicted_label})",
             str(p.count)] for p in metrics.most_confused]
    return f"{heading}\n\n" + table(["true class", "predicted as", "count"], rows)


def _worst_section(metrics: Metrics) -> str:
    # Classes without samples have no accuracy to speak of; they would crowd out real ones.
    supported = [c for c in metrics.per_class if c.support > 0]
    worst = sorted(supported, key=lambda c: (c.accuracy, c.label))[:WORST_CLASSES_LIMIT]
    return (f"## Worst classes (bottom {WORST_CLASSES_LIMIT})\n\n"
            + table(["label", "name", "accuracy", "support"], _class_cells(worst)))


def _per_class_section(metrics: Metrics) -> str:
    return "## Per-class accuracy\n\n" + table(["label", "name", "accuracy", "support"],
                                               _class_cells(metrics.per_class))


def _class_cells(classes: Sequence[ClassAccuracy]) -> list[list[str]]:
    return [[str(c.label), c.name, _pct(c.accuracy) if c.support else "n/a", str(c.support)]
            for c in classes]


def _link(path: str) -> str:
    # CommonMark ends a bare link target at a space; the <...> form allows one.
    return f"<{path}>" if " " in path else path


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


# --- the plots ----------------------------------------------------------------------------


def plot_confusion_matrix(metrics: Metrics, path: Path) -> Path:
    """Write the row-normalised confusion matrix as a PNG and return its path."""
    from matplotlib.figure import Figure

    num_classes = metrics.confusion.shape[0]
    normalised = _row_normalised(metrics.confusion)
    side = min(12.0, max(5.0, 0.1 * num_classes + 4))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix (row-normalised, n={metrics.n:,})")
    if num_classes <= CELL_TEXT_MAX_CLASSES:
        _annotate_small_matrix(ax, metrics, normalised)
    else:
        _label_large_matrix(ax, num_classes)
    return _save(fig, path)


def _row_normalised(confusion: np.ndarray) -> np.ndarray:
    totals = confusion.sum(axis=1, keepdims=True).astype(np.float64)
    # A class without samples stays an all-zero row instead of a row of NaNs.
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


def _annotate_small_matrix(ax: Any, metrics: Metrics, normalised: np.ndarray) -> None:
    ticks = range(len(metrics.per_class))
    labels = [f"{c.label} {c.name}" for c in metrics.per_class]
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    for (row, col), count in np.ndenumerate(metrics.confusion):
        if count:
            # Dark text on the bright end of viridis, light text on the dark end.
            color = "black" if normalised[row, col] > 0.6 else "white"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)


def _label_large_matrix(ax: Any, num_classes: int) -> None:
    # Label ticks every 10 classes (1, 11, 21, ...), at 0-based positions.
    positions = list(range(0, num_classes, 10))
    labels = [str(p + 1) for p in positions]
    ax.set_xticks(positions, labels)
    ax.set_yticks(positions, labels)


def plot_training_curves(history: Sequence[dict], path: Path) -> Path:
    """Write loss and validation-accuracy curves per epoch as a PNG and return its path.

    Rows missing a key (or holding None/NaN) are skipped for that curve only; a row without
    "epoch" counts as epoch (row index + 1).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    _plot_series(loss_ax, history, ["train_loss", "valid_loss"], "loss", "Loss")
    _plot_series(acc_ax, history, ["valid_top1", "valid_top5", "train_top1"], "accuracy",
                 "Validation accuracy")
    lr_epochs, lrs = _series(history, "lr")
    if lrs:
        lr_ax = acc_ax.twinx()
        lr_ax.plot(lr_epochs, lrs, color="tab:gray", linestyle=":", label="lr")
        # Schedules span orders of magnitude; a log axis keeps the warm-up and tail visible.
        if min(lrs) > 0:
            lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        # One legend for both axes, so the two boxes cannot overlap each other.
        lines = acc_ax.get_lines() + lr_ax.get_lines()
        acc_ax.legend(lines, [line.get_label() for line in lines], loc="best")
    return _save(fig, path)


def _plot_series(ax: Any, history: Sequence[dict], keys: list[str], ylabel: str,
                 title: str) -> None:
    plotted = False
    for key in keys:
        epochs, values = _series(history, key)
        if values:
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
            plotted = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    epochs: list[float] = []
    values: list[float] = []
    for index, row in enumerate(history):
        value = row.get(key)
        if _is_number(value) and math.isfinite(float(value)):
            epoch = row.get("epoch")
            epochs.append(float(epoch) if _is_number(epoch) else float(index + 1))
            values.append(float(value))
    return epochs, values


def _is_number(value: object) -> bool:
    # numbers.Real also admits numpy scalars (np.float32 is not a float subclass).
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    # A bare Figure is not registered with pyplot; clearing it frees its artists right away.
    fig.clear()
    return path
