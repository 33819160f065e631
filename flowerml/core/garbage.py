"""How a flowerml process schedules CPython's cyclic garbage collector.

A command loads torch, torchvision, Prefect and ONNX: a few hundred thousand objects that live
as long as the process. CPython's default schedule (thresholds 700, 10, 10) runs a full
collection after every ten middle-generation ones, and each full collection walks all of those
objects again: 0.5 of the 3.4 CPU-s that importing torch, torchvision and Prefect takes here,
and again, more slowly, for as long as the process runs. Collecting the oldest generation a
hundred times less often removes nearly all of it. The young generations keep their schedule,
so the short-lived cycles a command makes are collected as soon as before; only garbage that
survived two collections waits longer.
"""

from __future__ import annotations

import gc

FULL_COLLECTION_EVERY = 1000
"""Middle-generation collections between two full ones (CPython's default: 10)."""


def collect_long_lived_objects_rarely() -> None:
    """Keep the young generations' thresholds and make full collections a hundred times rarer.
    Called once by each entry point that owns its process (the console script, `python -m
    flowerml.cli`), never on import: a program that imports flowerml keeps its own schedule."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
