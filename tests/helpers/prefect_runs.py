"""Prefect runs in tests: a task run's outcome as the server recorded it."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound


def task_outcome(state) -> tuple[bool, str, int]:
    """(failed, message, run count) of a task run's final state, read back from the server."""

    async def read() -> int:
        # Task runs reach the server through its event stream, a moment after their state
        # returns here: wait for the final state rather than read a missing or stale run.
        deadline = asyncio.get_running_loop().time() + 60
        async with get_client() as client:
            while True:
                try:
                    run = await client.read_task_run(state.state_details.task_run_id)
                    if run.state_type == state.type:
                        return run.run_count
                except ObjectNotFound:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "task run not recorded"
                await asyncio.sleep(0.2)

    return state.is_failed(), state.message or "", asyncio.run(read())
