"""Ready sooner: what the retrain flow's later tasks import, imported in the background.

Evaluation, the gate, registration and the ONNX export import torch, torchvision and ONNX in
this process, seconds of CPU the run would otherwise spend after training, in series; imported
while the training child runs (this process only waits for it then), they are ready when
evaluation starts."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable

TASK_MODULES = ("flowerml.evaluation.inference", "flowerml.evaluation.report",
                "flowerml.registry.promotion", "flowerml.registry.release",
                "flowerml.serving.export", "onnx", "onnxruntime",
                "matplotlib.figure", "matplotlib.backends.backend_agg")


def in_background(name: str, work: Callable[[], object]) -> threading.Thread:
    """`work` on a daemon thread. A failure there is not reported: the run meets it again
    (and reports it) when it does the same work itself."""
    def run() -> None:
        with contextlib.suppress(Exception):
            work()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def import_task_modules() -> None:
    for name in TASK_MODULES:
        importlib.import_module(name)
