"""The e2e benchmark's chart: a run's stages as horizontal stacked bars, coloured by category
(start-up, Prefect, data, training epochs, evaluation, export, ...), drawn with matplotlib.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CATEGORIES = [  # (category, colour, stage names or prefixes)
    ("start-up and imports", "#9e9e9e", ("CLI start", "training child start",
                                         "training child imports", "python start and imports",
                                         "before the flow", "summary and exit",
                                         "training child exit")),
    ("option checks", "#bdbdbd", ("option checks",)),
    ("Prefect", "#7e57c2", ("Prefect start", "Prefect between tasks", "Prefect stop",
                            "train task (Prefect)")),
    ("data: fetch, publish, split", "#26a69a", ("fetch", "publish", "split script",
                                                "demo archive")),
    ("data: sync and decode cache", "#80cbc4", ("sync", "decode cache", "test split prepared")),
    ("model build and setup", "#ffb74d", ("model build", "training setup",
                                          "loaders and model build")),
    ("training epochs", "#e53935", ("epoch", "epochs train")),
    ("validation (per epoch)", "#ef9a9a", ("valid",)),
    ("checkpoints (per epoch)", "#b71c1c", ("checkpoint",)),
    ("test evaluation", "#42a5f5", ("test evaluation",)),
    ("decide, register, promote", "#8d6e63", ("decide", "register", "promote")),
    ("ONNX export and parity", "#fdd835", ("export",)),
]


def category_of(stage: str) -> str:
    if stage.startswith("epoch") and stage.endswith("valid") or stage == "epochs valid":
        return "validation (per epoch)"
    if stage.startswith("epoch") and stage.endswith("checkpoint"):
        return "checkpoints (per epoch)"
    for name, _colour, members in CATEGORIES:
        if stage in members or any(stage.startswith(m + " ") for m in members):
            return name
    return "start-up and imports"


def by_category(stages: list[dict]) -> dict[str, float]:
    sums = {name: 0.0 for name, _colour, _members in CATEGORIES}
    for stage in stages:
        sums[category_of(stage["stage"])] += max(stage["seconds"], 0.0)
    return sums


def draw_chart(bars: list[tuple[str, list[dict]]], title: str, path: Path) -> None:
    """A horizontal stacked bar per (label, stages), coloured by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.9 + 0.8 * len(bars)))
    labels = [label for label, _stages in bars]
    for index, (_label, stages) in enumerate(bars):
        left = 0.0
        for name, colour, _members in CATEGORIES:
            seconds = by_category(stages)[name]
            if seconds <= 0:
                continue
            ax.barh(index, seconds, left=left, color=colour, edgecolor="white",
                    label=name if index == 0 or name not in ax.get_legend_handles_labels()[1]
                    else None)
            if seconds >= 0.06 * max(sum(by_category(s).values()) for _l, s in bars):
                ax.text(left + seconds / 2, index, f"{seconds:.0f}", ha="center", va="center",
                        fontsize=8)
            left += seconds
        ax.text(left, index, f"  {left:.0f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.3),
              ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_bars(case: str, result: dict) -> list[tuple[str, list[dict]]]:
    if case == "demo":
        runs = {label: sum(1 for run in result["runs"] if run["label"] == label)
                for label in result["medians"]}
        return [(f"{label}\n(median of {runs[label]})", medians["stages"])
                for label, medians in result["medians"].items()]
    epochs = result["flowerml"]["epochs"]
    bars = [(f"flowerml retrain, {epochs} epochs\n(measured)", result["flowerml"]["stages"])]
    if "tutorial" in result:
        same = result["tutorial"]["extrapolated_same_epochs"]
        full = result["tutorial"]["extrapolated_full_run"]
        # Its own 40 epochs would dwarf the rest: named, not drawn.
        bars.append((f"tutorial, {same['epochs']} epochs (1 measured)\n(its {full['epochs']} "
                     f"epochs: {full['seconds']:,.0f} s)", same["stages"]))
    return bars


def chart_title(args: argparse.Namespace, report: dict) -> str:
    where = report["machine"].get("gpu") or f"{os.cpu_count()} CPU cores"
    if args.case == "demo":
        epochs = f", {args.epochs} epochs" if args.epochs else ""
        return f"flowerml retrain --preset demo{epochs}: where the wall time goes ({where})"
    return (f"flowerml retrain, {args.case} case at scale {args.scale:g}: where the wall time "
            f"goes ({where})")
