"""`flowerml worker` (flows/worker.py) around a stand-in Prefect worker: on SIGTERM it freezes the
worker's polling at once, SIGTERMs the flow-run processes the worker started, waits for them,
ends the worker and exits 0. The real Prefect worker, server and runs:
tests/deploy/test_deployment_workers.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.worker import worker_command

pytestmark = pytest.mark.slow

# A stand-in for `prefect worker start`: it "polls" (a line per 50 ms in polls.txt) and has
# started one flow run, a child process whose environment names it, as Prefect's are.
STAND_IN_WORKER = textwrap.dedent("""
    import os, subprocess, sys, time
    folder = sys.argv[1]
    engine = ('import signal, sys, time\\n'
              'def stop(*_):\\n'
              '    open(sys.argv[1] + "/engine-stopped", "w").close()\\n'
              '    sys.exit(0)\\n'
              'signal.signal(signal.SIGTERM, stop)\\n'
              'open(sys.argv[1] + "/engine-started", "w").close()\\n'
              'time.sleep(600)\\n')
    subprocess.Popen([sys.executable, "-c", engine, folder], start_new_session=True,
                     env={**os.environ, "PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-00000000abcd"})
    while True:
        with open(folder + "/polls.txt", "a") as polls:
            polls.write("poll\\n")
        time.sleep(0.05)
""")


def start_drainable_worker(folder: Path) -> subprocess.Popen:
    (folder / "worker.py").write_text(STAND_IN_WORKER)
    runner = textwrap.dedent(f"""
        import sys
        import flows.worker as worker
        worker.worker_command = lambda arguments: [sys.executable, {str(folder / 'worker.py')!r},
                                                    {str(folder)!r}]
        sys.exit(worker.run_worker([], grace_s=20))
    """)
    # No Prefect API answers here: the last check of the run's state fails fast and says so.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_CLIENT_MAX_RETRIES": "0"}
    return subprocess.Popen([sys.executable, "-c", runner], env=env, stderr=subprocess.PIPE,
                            text=True)


def test_a_stopped_worker_polls_no_more_and_stops_its_flow_run(tmp_path: Path) -> None:
    wrapper = start_drainable_worker(tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "engine-started").exists():
        assert time.monotonic() < deadline and wrapper.poll() is None, "the worker did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    wrapper.send_signal(signal.SIGTERM)
    polls_at_signal = len((tmp_path / "polls.txt").read_text().splitlines())
    _, stderr = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 0, stderr
    assert (tmp_path / "engine-stopped").exists()  # SIGTERM: Prefect's crash path, not a kill
    # Frozen at once: at most the poll that was being written when the signal came.
    assert len((tmp_path / "polls.txt").read_text().splitlines()) <= polls_at_signal + 1
    assert "1 flow run(s) to stop (00000000-0000-0000-0000-00000000abcd)" in stderr
    assert "could not check flow run 00000000-0000-0000-0000-00000000abcd" in stderr
    assert stderr.rstrip().endswith("flowerml worker: stopped")


def test_the_prefect_worker_is_a_process_worker_unless_told_otherwise() -> None:
    assert worker_command(["--pool", "gpu"])[-2:] == ["--type", "process"]
    assert worker_command(["--pool", "gpu", "--type", "docker"]).count("--type") == 1
    assert worker_command(["--pool", "gpu", "--type=process"]).count("--type") == 0


def test_a_killed_wrapper_takes_its_prefect_worker_with_it(tmp_path: Path) -> None:
    """SIGKILL (OOM killer) leaves no orphaned worker polling on: it gets SIGTERM."""
    import psutil

    wrapper = start_drainable_worker(tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "engine-started").exists():
        assert time.monotonic() < deadline and wrapper.poll() is None, "the worker did not start"
        time.sleep(0.05)
    [worker] = psutil.Process(wrapper.pid).children()
    wrapper.kill()
    wrapper.wait(timeout=30)
    worker.wait(timeout=30)  # psutil.TimeoutExpired if it were left polling
    for engine in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (engine.info["environ"] or {}).get("PREFECT__FLOW_RUN_ID", "").endswith("abcd"):
                engine.kill()  # the stand-in engine ignores its worker's death; tidy it
