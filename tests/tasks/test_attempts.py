"""Closing what a killed attempt of a flow run left Running, on the session's Prefect server."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.states import Completed, Running

from tasks.attempts import close_interrupted_attempts

pytestmark = pytest.mark.slow


@task(name="train")
def stand_in() -> None:
    """Only its name and identity are used: the killed attempt's task run."""


def left_running(flow_run_id, name: str, state=None):
    """A task run of `flow_run_id` in Running, as a SIGKILLed attempt leaves it (or in
    `state`), written to the server before this returns."""
    with get_client(sync_client=True) as client:
        return client.create_task_run(stand_in, flow_run_id, dynamic_key=name, name=name,
                                      state=state or Running())


def state_of(task_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).state


def test_a_resumed_attempt_marks_what_the_killed_one_left_running_crashed(
        prefect_harness: None) -> None:
    @flow
    def resumed() -> tuple:
        from prefect.runtime import flow_run

        debris = left_running(flow_run.id, "train r1")
        first = close_interrupted_attempts(flow_run.id, attempt=1)
        kept = state_of(debris.id)
        closed = close_interrupted_attempts(flow_run.id, attempt=2)
        return first, kept, closed, state_of(debris.id)

    first, kept, closed, after = resumed()
    assert first == [] and kept.type.value == "RUNNING"  # a first attempt has nothing to close
    assert closed == ["train r1"]
    assert after.type.value == "CRASHED" and after.message == (
        "attempt 1 of this flow run ended without a word (its process was killed); "
        "attempt 2 resumes its work")


def test_finished_task_runs_and_other_flow_runs_are_left_alone(prefect_harness: None) -> None:
    @flow
    def other() -> object:
        from prefect.runtime import flow_run

        return left_running(flow_run.id, "train elsewhere")

    elsewhere = other()

    @flow
    def resumed() -> list[str]:
        from prefect.runtime import flow_run

        left_running(flow_run.id, "fetch", Completed())  # finished before the kill
        return close_interrupted_attempts(flow_run.id, attempt=2)

    assert resumed() == []
    assert state_of(elsewhere.id).type.value == "RUNNING"
