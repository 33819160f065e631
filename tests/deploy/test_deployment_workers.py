"""How a `flowerml worker` of the deployment stops (deploy/systemd's unit, one SIGTERM), on the
real deployment path of test_deployment.py (a module of its own, so its server and runs go on
another xdist worker): idle, it ends within seconds; training, it takes no new run, its training
child stops, the run is Crashed at once and rescheduled, and the next worker resumes it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flowerml.core.launch import process_alive
from flowerml.io.storage import S3Options
from flowerml.io.storage_s3 import S3Store
from flowerml.training.runs import RunFiles
from flows.retrain import training_run_id
from tests.helpers.deployment import (
    BatchedPrefect,
    assert_nothing_left_running,
    command_line,
    descendants,
    run_params,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def stop_as_the_unit_does(worker, timeout: float = 60) -> list[int]:
    """deploy/systemd's stop (KillMode=mixed): SIGTERM to the main process, `flowerml worker`;
    once it has exited (or after TimeoutStopSec), SIGKILL to whatever is left of the unit.
    Returns the processes that were still left for that SIGKILL."""
    unit = [worker.pid, *descendants(worker.pid)]
    os.kill(worker.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=timeout)
    left = [pid for pid in unit if process_alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def test_the_systemd_stop_sequence_stops_an_idle_worker_at_once(
        prefect_stack: BatchedPrefect) -> None:
    """deploy/systemd: one SIGTERM to `flowerml worker` ends an idle worker within seconds
    (a bare Prefect worker sat on its first SIGTERM for minutes), and so do two in a row."""
    prefect = prefect_stack
    prefect.prefect("work-pool", "create", "idle", "--type", "process")
    # Started side by side: one is stopped as the unit does, the other with two SIGTERMs.
    worker = prefect.start_worker("idle", "--limit", "1", name="idle-worker")
    again = prefect.start_worker("idle", "--limit", "1", name="idle-worker-2")
    deadline = time.monotonic() + 120
    for name, process in (("idle-worker", worker), ("idle-worker-2", again)):
        while "started!" not in (prefect.root / f"{name}.log").read_text():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
    started = time.monotonic()
    assert stop_as_the_unit_does(worker, timeout=30) == []
    assert worker.returncode == 0 and time.monotonic() - started < 10
    # The runbook's old habit, two SIGTERMs in a row, ends an idle worker as fast.
    assert again.poll() is None
    started = time.monotonic()
    os.kill(again.pid, signal.SIGTERM)
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait(timeout=30) == 0 and time.monotonic() - started < 10


def training_pids(root_pid: int) -> list[int]:
    return [p for p in descendants(root_pid) if "flowerml.cli train" in command_line(p)]


def wait_for_checkpoint_past(store: S3Store, run_id: str, epoch: int, prefect: BatchedPrefect,
                             timeout: float = 300) -> int:
    """The epoch of the run's checkpoint once it is past `epoch`."""
    pointer = RunFiles(store, run_id).key("checkpoint.json")
    deadline = time.monotonic() + timeout
    while True:
        if store.exists(pointer) and (
                saved := json.loads(store.get_bytes(pointer))["epoch"]) > epoch:
            return saved
        assert time.monotonic() < deadline, f"no checkpoint past epoch {epoch}; logs in " \
                                            f"{prefect.root}"
        time.sleep(0.2)


def stop_busy_worker(prefect: BatchedPrefect, worker, run: str, waiting: str | None,
                     stop: str) -> dict[str, float]:
    """Stop a worker that is training `run`; check it lets go within the runbook's bounds and
    takes nothing new (`waiting` is queued behind it). Returns the timings."""
    trainers = training_pids(worker.pid)
    assert trainers, "the training child is not running"
    signalled = time.monotonic()
    if stop == "unit":
        assert stop_as_the_unit_does(worker) == [], "the unit had processes left to SIGKILL"
    else:  # one SIGTERM: `docker stop`, Kubernetes, `kill -TERM`
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    timings = {"worker exited": time.monotonic() - signalled}
    while any(process_alive(p) for p in trainers):
        assert time.monotonic() - signalled < 20, "the training child outlived its worker"
        time.sleep(0.1)
    timings["training child stopped"] = time.monotonic() - signalled
    while prefect.flow_run(run)["state_type"] in ("RUNNING", "PENDING"):
        assert time.monotonic() - signalled < 15, "the run stayed Running after the stop"
        time.sleep(0.2)
    timings["run left Running"] = time.monotonic() - signalled
    assert worker.returncode == 0
    time.sleep(2)  # a worker that still polled (every 1 s here) would take a run now
    assert prefect.flow_run(run)["state_name"] == "Recovering"
    if waiting:
        assert prefect.flow_run(waiting)["state_type"] == "SCHEDULED"
    return timings


# ~0.25 s each here: long enough to be stopped twice while training (each stop lets one or two
# more epochs start, and the resumed attempt trains on from the last checkpoint).
EPOCHS = 20


def test_a_stopped_busy_worker_lets_go_and_the_run_resumes_on_the_next(
        prefect_stack: BatchedPrefect, s3_bucket: str, moto_endpoint: str,
        synthetic_source: Path) -> None:
    """A worker training a run is stopped twice, as systemd stops the unit and with a single
    SIGTERM: each time it takes no new run, its training child stops, the run is
    Crashed at once (not 90 s later by the zombie rule) and rescheduled, and the next worker
    resumes it from its checkpoint; it ends Completed with nothing of the stopped attempts
    left Running and one progress bar at 100%."""
    prefect = prefect_stack
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))
    run = prefect.run_deployment("retrain-flowers/retrain-manual",
                                 run_params(synthetic_source, s3_bucket, epochs=EPOCHS))
    # Queued behind it (the pool's one slot): a stopping worker must not take it.
    waiting = prefect.run_deployment("retrain-flowers/retrain-manual",
                                     run_params(synthetic_source, s3_bucket, epochs=1))
    run_id = training_run_id("flowers102", run)
    epoch, timings = 0, {}
    for attempt, stop in enumerate(("unit", "one SIGTERM"), start=1):
        worker = prefect.start_worker("gpu", "--limit", "1", name=f"busy-{attempt}")
        epoch = wait_for_checkpoint_past(store, run_id, epoch, prefect)
        timings[stop] = stop_busy_worker(prefect, worker, run, waiting, stop)
        if waiting:  # it has shown that the stopped worker took nothing; the next would
            prefect.api(f"/flow_runs/{waiting}", method="DELETE")
            waiting = None
    last = prefect.start_worker("gpu", "--limit", "1", name="busy-3")
    final = prefect.wait_for_final_state(run, timeout=600)
    assert final["state_type"] == "COMPLETED", f"{final['state_name']}; logs in {prefect.root}"
    prefect.stop_worker(last)
    history = [s["name"] for s in prefect.api(f"/flow_run_states/?flow_run_id={run}")]
    assert history.count("Crashed") == 2 and history.count("Recovering") == 2, history
    result = json.loads(store.get_bytes(RunFiles(store, run_id).key("result.json")))
    assert result["resumed_from_epoch"] >= 2 and result["epochs_run"] == EPOCHS
    assert_nothing_left_running(prefect, run)
    print(f"\nbusy worker stops: {json.dumps(timings)}")
