"""Prefect runs in tests: a task run's outcome, and a flow run's task runs' times, as the server
recorded them."""

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


def task_run_times(flow_run_id: str, names: tuple[str, ...]) -> dict[str, tuple]:
    """{name: (start, end)} of the flow run's task runs whose run name starts with each of
    `names`, once the server has recorded all of them as ended."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, tuple]:
        deadline = asyncio.get_running_loop().time() + 60
        async with get_client() as client:
            while True:
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[flow_run_id])))
                times = {name: (run.start_time, run.end_time) for name in names
                         for run in runs if run.name.startswith(name) and run.end_time}
                if len(times) == len(names):
                    return times
                assert asyncio.get_running_loop().time() < deadline, \
                    f"task runs not recorded: {sorted(set(names) - set(times))}"
                await asyncio.sleep(0.2)

    return asyncio.run(read())
