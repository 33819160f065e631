"""The idle priority: work on a thread of its own at SCHED_IDLE, which the threads it starts
inherit, while the caller keeps its own."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from flowerml.core.errors import DataError
from flowerml.core.priority import idle_priority_available, run_when_idle

pytestmark = pytest.mark.skipif(not idle_priority_available(),
                                reason="per-thread scheduling is Linux's")


def this_thread() -> tuple[int, int]:
    """(thread id, scheduling policy) of the calling thread."""
    native = threading.get_native_id()
    return native, os.sched_getscheduler(native)


def test_the_work_runs_on_its_own_thread_at_the_idle_class() -> None:
    caller, caller_policy = this_thread()
    worker, policy = run_when_idle(this_thread)
    assert worker != caller
    assert policy == os.SCHED_IDLE
    assert this_thread() == (caller, caller_policy)  # the caller is not lowered
    assert caller_policy != os.SCHED_IDLE


def test_threads_the_work_starts_inherit_the_idle_class() -> None:
    def in_a_pool() -> list[int]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return [policy for _thread, policy in pool.map(lambda _: this_thread(), range(4))]

    assert run_when_idle(in_a_pool) == [os.SCHED_IDLE] * 4


def test_the_works_exception_reaches_the_caller_as_it_was() -> None:
    def refuse() -> None:
        raise DataError("split 'test' has no images")

    with pytest.raises(DataError, match="split 'test' has no images"):
        run_when_idle(refuse)
