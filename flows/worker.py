"""`flowerml worker`: a Prefect process worker that lets go of its flow runs when stopped.

Prefect 3.9's `prefect worker start` turns its first SIGTERM into SIGINT and a second one into
SIGKILL. Either way its teardown closes each running flow run's process handle, and anyio's
close SIGKILLs that process: the engine never gets to report. The run stays Running and holds
its pool slot until the zombie automation marks it Crashed (90 s without a heartbeat), and
its training child trains on until it notices its launcher is gone.

This command runs `prefect worker start --type process ...` as its child and, on SIGTERM or
SIGINT, drains it in an order that Prefect's own shutdown cannot give:
1. the worker is frozen (SIGSTOP): from that instant it takes no new run, and it cannot kill
   the runs it started;
2. each flow-run process it started gets SIGTERM, Prefect's own crash path for a flow run: the
   engine raises TerminationSignal in the flow, the train task stops its child's process group
   (the last checkpoint stays; at most 10 s), and the engine reports the run Crashed, which
   frees its pool slot; the recovery automation (deploy/automations/operations.yaml) then
   reschedules it for the next worker, which resumes the checkpoint;
3. once they have exited (at most `--grace` s, or at once on a second signal), the frozen
   worker is killed (it holds nothing that needs a goodbye) and the command exits 0. A run
   whose process did not report is marked Crashed through the Prefect API here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from flowerml.core.launch import process_alive

DEFAULT_GRACE_S = 30.0
POLL_S = 0.2


@dataclass(frozen=True)
class FlowRunProcess:
    """A flow-run process the worker started, and the flow run it executes."""

    pid: int
    flow_run_id: str


def worker_command(arguments: Sequence[str]) -> list[str]:
    """`prefect worker start ARGUMENTS`, as a process worker unless a type is given."""
    given = list(arguments)
    if not any(a == "--type" or a.startswith("--type=") or a == "-t" for a in given):
        given += ["--type", "process"]
    return [sys.executable, "-m", "prefect", "worker", "start", *given]


def flow_run_processes(worker_pid: int) -> list[FlowRunProcess]:
    """The worker's children that execute a flow run (their environment names it)."""
    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(worker_pid).children():
            with contextlib.suppress(psutil.Error):
                run_id = child.environ().get("PREFECT__FLOW_RUN_ID")
                if run_id:
                    found.append(FlowRunProcess(child.pid, run_id))
    return found


class Stop:
    """The stop requests (SIGTERM, SIGINT) this process has received."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self, signum: int, _frame: object) -> None:
        self.count += 1
        self.event.set()

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self)


def die_with_parent(parent: int):
    """A preexec_fn that has the Prefect worker get SIGTERM when this process dies however it
    dies (SIGKILL, OOM): an orphaned worker would go on polling and take runs unsupervised. On
    SIGTERM it ends the way a bare Prefect worker does; its runs then go by the zombie rule."""

    def arrange() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return arrange


def say(message: str) -> None:
    print(f"flowerml worker: {message}", file=sys.stderr, flush=True)


def run_worker(arguments: Sequence[str], grace_s: float = DEFAULT_GRACE_S) -> int:
    """Run the Prefect worker until it exits (its exit code) or a stop request drains it (0)."""
    stop = Stop()
    stop.install()
    worker = subprocess.Popen(worker_command(arguments), start_new_session=True,
                              preexec_fn=die_with_parent(os.getpid()))
    say(f"started the Prefect worker (pid {worker.pid}); SIGTERM or Ctrl-C drains it")
    while worker.poll() is None:
        if stop.event.wait(POLL_S):
            drain(worker, stop, grace_s)
            return 0
    return worker.returncode


def drain(worker: subprocess.Popen, stop: Stop, grace_s: float) -> None:
    """Stop the worker polling, crash its flow runs the way Prefect records, then end it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signal.SIGSTOP)
    runs = flow_run_processes(worker.pid)
    say(f"stopping: polling frozen; {len(runs)} flow run(s) to stop "
        f"({', '.join(r.flow_run_id for r in runs) or 'none'})")
    for run in runs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGTERM)
    signals_before = stop.count
    deadline = time.monotonic() + grace_s
    while any(process_alive(r.pid) for r in runs):  # exited, unreaped by the frozen worker: gone
        if time.monotonic() > deadline or stop.count > signals_before:
            say("flow runs still running: killing them")
            for run in runs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(run.pid), signal.SIGKILL)
            break
        time.sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    mark_unreported_crashed([r.flow_run_id for r in runs])
    say("stopped")


def mark_unreported_crashed(flow_run_ids: Sequence[str]) -> None:
    """Mark Crashed each run whose process ended without reporting a final state."""
    if not flow_run_ids:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.type.value in ("RUNNING", "PENDING"):
                    client.set_flow_run_state(flow_run_id, Crashed(
                        message="its worker was stopped and the flow-run process ended "
                                "without reporting (marked by flowerml worker)"), force=True)
                    say(f"flow run {flow_run_id} marked Crashed")
            except Exception as error:  # the API may be down; zombie detection remains
                say(f"could not check flow run {flow_run_id}: {type(error).__name__}")


def build_worker_command():
    """The `flowerml worker` click command (registered by flows.cli)."""
    import click

    @click.command(name="worker", context_settings={
        "ignore_unknown_options": True, "allow_extra_args": True})
    @click.option("--grace", type=click.FloatRange(1, 3600), default=DEFAULT_GRACE_S,
                  show_default=True,
                  help="Seconds a stopped worker's flow runs get to report Crashed (their "
                       "training child stops within 10 s) before they are killed.")
    @click.argument("prefect_options", nargs=-1, type=click.UNPROCESSED)
    def worker(grace: float, prefect_options: tuple[str, ...]) -> None:
        """A Prefect process worker that drains on SIGTERM or Ctrl-C.

        PREFECT_OPTIONS are `prefect worker start`'s (`--pool gpu --limit 1 --name gpu0`;
        `--type process` unless given). On SIGTERM or SIGINT it stops polling at once, stops
        each flow run it started (Crashed within seconds, its training child checkpointed or
        stopped within 10 s, its pool slot free, rescheduled by the recovery automation) and
        exits 0. A second signal stops the wait. See deploy/README.md, "Stopping a worker".
        """
        raise SystemExit(run_worker(prefect_options, grace))

    return worker
