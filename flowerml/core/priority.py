"""Work that only takes the CPU nothing else wants: a thread at Linux's idle scheduling class.

`run_when_idle(work)` runs `work` on a thread of its own that first moves itself to
SCHED_IDLE (or, where that class is refused, the lowest nice value). On Linux both are
attributes of a thread, which every thread and process it starts inherits, so a decode pool
started inside `work` idles with it; the caller's thread and every other thread keep their
priority, and a pooled thread is never lowered for good (an unprivileged process cannot raise
it again). Where Linux's per-thread scheduling is absent, `idle_priority_available()` is False
and the caller decides whether to run the work at all.

Linux's autogroup scheduler first shares the CPU between sessions, then within each: the idle
class yields to the work of its own session only. The training child therefore stays in its
launcher's session (`flowerml.core.launch`, a process group of its own).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
LOWEST_NICE = 19


def idle_priority_available() -> bool:
    """Whether this platform lowers one thread alone (Linux: scheduling is per thread)."""
    return sys.platform.startswith("linux") and hasattr(os, "sched_setscheduler")


def lower_this_thread() -> None:
    """Move the calling thread to SCHED_IDLE, or to nice 19 where that class is refused."""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        os.setpriority(os.PRIO_PROCESS, thread, LOWEST_NICE)


def run_when_idle(work: Callable[[], T], name: str = "flowerml-idle") -> T:
    """`work()` on a new thread at the idle priority (`lower_this_thread`); its result, or its
    exception raised here. Only where `idle_priority_available()`."""
    if not idle_priority_available():
        raise RuntimeError("idle priority needs Linux's per-thread scheduling")
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            lower_this_thread()
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller, who raises it
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
