"""What a flow run's earlier, killed attempt left behind, closed when a later attempt starts.

A flow-run process that is SIGKILLed (OOM killer, a lost host, a worker killed outright) cannot
report anything: the zombie automation marks the flow run Crashed, but its task runs stay
Running for ever (a growing bar in the run graph). When the recovery automation resumes the
flow run, this attempt marks them Crashed, saying which attempt resumes them. Progress bars
are not left behind either: the resumed training reuses its predecessor's artifact (see
tasks/train.py), so the run ends with one bar at 100%.
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_run_logger

UNFINISHED = ["PENDING", "RUNNING", "SCHEDULED", "PAUSED", "CANCELLING"]


def close_interrupted_attempts(flow_run_id: UUID, attempt: int) -> list[str]:
    """Mark Crashed every task run of `flow_run_id` that an earlier attempt left unfinished;
    returns their names. Called first thing in an attempt, before it starts any task."""
    if attempt <= 1:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.states import Crashed

    message = (f"attempt {attempt - 1} of this flow run ended without a word (its process was "
               f"killed); attempt {attempt} resumes its work")
    closed = []
    with get_client(sync_client=True) as client:
        debris = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=UNFINISHED))))
        for task_run in debris:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            closed.append(task_run.name)
    if closed:
        get_run_logger().info("closed what attempt %d left running: %s", attempt - 1,
                              ", ".join(sorted(closed)))
    return closed
