"""The training child process: streamed lines, whole-group stop, errors that guide retries."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from flowerml.core.launch import (
    ChildOutcome,
    TrainingCrashed,
    TrainingRefused,
    TrainingTimeout,
    check_outcome,
    group_alive,
    iter_events,
    process_alive,
    run_child,
    train_command,
)

GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:  # a reaped-later zombie counts as gone
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_streams_lines_and_returns_exit_code() -> None:
    seen: list[str] = []
    outcome = run_child([sys.executable, "-c", "print('a'); print('{\"x\": 1}'); exit(3)"],
                        on_line=seen.append)
    assert seen == ["a", '{"x": 1}']
    assert outcome.returncode == 3 and outcome.tail == ("a", '{"x": 1}')


def test_the_child_leads_its_own_group_in_its_launchers_session() -> None:
    """Its own group, so that stopping it stops everything it started; its launcher's
    session (Linux's autogroup), so that work the launcher runs at the idle priority
    meanwhile yields to training instead of sharing the CPU with it as an equal."""
    seen: list[str] = []
    script = ("import os, sys; print(os.getpid(), os.getpgid(0), os.getsid(0)); "
              "print(sys.stdin.read() == '')")
    assert run_child([sys.executable, "-c", script], on_line=seen.append).returncode == 0
    pid, group, session = map(int, seen[0].split())
    assert group == pid != os.getpgid(0)
    assert session == os.getsid(0)
    assert seen[1] == "True"  # no terminal to read from: its input is empty


def test_timeout_stops_the_whole_process_group() -> None:
    pids: list[str] = []
    started = time.monotonic()
    with pytest.raises(TrainingTimeout, match="1 s limit"):
        run_child([sys.executable, "-c", GRANDCHILD], on_line=pids.append, timeout=1, grace=1)
    assert time.monotonic() - started < 10
    grandchild = int(pids[0])
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_cancellation_in_the_parent_stops_the_group() -> None:
    pids: list[str] = []

    def cancel(line: str) -> None:
        pids.append(line)
        raise KeyboardInterrupt  # what a cancelled or terminated flow run raises in its thread

    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "-c", GRANDCHILD], on_line=cancel, grace=1)
    deadline = time.monotonic() + 5
    while alive(int(pids[0])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(pids[0]))


def test_outcomes_map_to_retry_classes() -> None:
    check_outcome(ChildOutcome(0, ()))
    with pytest.raises(TrainingRefused, match="^--lr must be between"):
        check_outcome(ChildOutcome(2, ("flowerml: error: --lr must be between 1e-07 and 10",)))
    with pytest.raises(TrainingCrashed, match="code -9"):
        check_outcome(ChildOutcome(-9, ("epoch 3",)))


def test_train_command_uses_torchrun_for_several_gpus() -> None:
    # train_command now also passes --exit-with-parent <this pid> to the child
    assert train_command(["--epochs", "1"])[-6:] == [
        "flowerml.cli", "train", "--exit-with-parent", str(os.getpid()), "--epochs", "1"]
    command = train_command(["--epochs", "1"], nproc_per_node=4)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in command


# A launcher that starts a training-like child in its own session (as run_child does), prints
# the child's pid, then hangs: the test SIGKILLs it, as the OOM killer or `kill -9` would.
LAUNCHER = """
import os, subprocess, sys
watcher = (
    "import os, sys, time; from flowerml.core.launch import exit_with_parent_process; "
    "exit_with_parent_process(int(sys.argv[1]), interval=0.2); "
    "child = __import__('subprocess').Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(os.getpid(), child.pid, flush=True); time.sleep(600)")
child = subprocess.Popen([sys.executable, "-c", watcher, str(os.getpid())],
                         start_new_session=True)
child.wait()
"""


def test_a_child_dies_with_its_killed_launcher() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE,
                                text=True)
    child, grandchild = map(int, launcher.stdout.readline().split())
    assert alive(child) and alive(grandchild)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child) and not alive(grandchild)  # its whole group went with it


def wait_for_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.02)


def test_process_alive() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert process_alive(os.getpid()) and not process_alive(done.pid)


def test_a_zombie_is_not_alive() -> None:
    """Exited but not reaped yet: the pid still exists (kill 0 succeeds), the process is gone."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for_zombie(exited.pid)
    os.kill(exited.pid, 0)  # still there for the kernel
    assert not process_alive(exited.pid)
    exited.wait()


def test_group_alive_while_any_member_runs() -> None:
    """A group whose leader has exited (a zombie, unreaped) is alive while a member runs;
    once the last member is a zombie too, it counts as gone."""
    leader = subprocess.Popen([sys.executable, "-c", GRANDCHILD], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    member = int(leader.stdout.readline())
    try:
        assert group_alive(leader.pid)
        leader.kill()
        wait_for_zombie(leader.pid)
        assert group_alive(leader.pid)  # the member still runs in the leader's group
        os.kill(member, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(member) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group_alive(leader.pid)  # the leader is still an unreaped zombie
        os.killpg(leader.pid, 0)  # which the kernel still counts as a member
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_iter_events_keeps_only_json_objects() -> None:
    lines = ["epoch 1", '{"event": "epoch", "epoch": 1}', "{not json", ' {"epoch": 2} ']
    assert list(iter_events(lines)) == [{"event": "epoch", "epoch": 1}, {"epoch": 2}]


# A child that dies at once on SIGTERM, and a grandchild in its group that takes a second to
# go (as DataLoader workers and torchrun's ranks can).
STRAGGLER = """
import subprocess, sys, time
slow = ("import signal, sys, time\\n"
        "def leave(*_):\\n    time.sleep(1)\\n    sys.exit(0)\\n"
        "signal.signal(signal.SIGTERM, leave)\\n"
        "print('ready', flush=True)\\n"
        "time.sleep(600)\\n")
child = subprocess.Popen([sys.executable, "-c", slow])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stopping_waits_for_the_whole_group() -> None:
    lines: list[str] = []

    def cancel_when_ready(line: str) -> None:
        lines.append(line)
        if "ready" in lines:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "-c", STRAGGLER], on_line=cancel_when_ready, grace=10)
    grandchild = int(lines[0])
    assert not alive(grandchild)  # gone when run_child returns, not a second later
