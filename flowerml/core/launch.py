"""Running training as a child process: stream its output, stop it whole.

The child runs in its own process group, so stopping it, on timeout, on cancellation of the
parent or on any error, stops torchrun and all of its workers with it. It stays in its
launcher's session: Linux's autogroup scheduler shares the CPU between sessions first, so a
child in a session of its own would compete as an equal with the work its launcher runs at the
idle priority meanwhile (`flowerml.core.priority`), instead of taking the CPU from it.
A child also watches its launcher (`--exit-with-parent`): when the launcher dies without
stopping it (SIGKILL, out of memory), the child stops its own group within seconds instead of
training on unattended, holding the GPU, until a write to its dead pipe fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from flowerml.core.errors import TransientError, UserError


class TrainingTimeout(TransientError):
    """The child ran past its time limit and was stopped (a retry resumes it)."""


class TrainingCrashed(TransientError):
    """The child died (signal, out of memory, lost GPU); a retry resumes from its checkpoint."""


class TrainingRefused(UserError):
    """The child rejected its input (exit code 2); retrying cannot help."""


@dataclass(frozen=True)
class ChildOutcome:
    returncode: int
    tail: tuple[str, ...]


def train_command(arguments: Sequence[str], nproc_per_node: int = 1) -> list[str]:
    """`flowerml train ...` (or under torchrun for several GPUs) that dies with this process."""
    train = ["-m", "flowerml.cli", "train", "--exit-with-parent", str(os.getpid()), *arguments]
    if nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc_per_node}", *train]
    return [sys.executable, *train]


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; whether it is a zombie we may not know


def exit_with_parent_process(pid: int, interval: float = 1.0, grace: float = 10.0) -> None:
    """Stop this process's group once `pid` is gone; a daemon thread checks every `interval`."""

    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgrp(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)  # SIGTERM was caught and ignored somewhere: leave anyway

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def stop_group(process: subprocess.Popen, grace: float,
               first: signal.Signals = signal.SIGTERM) -> None:
    """Send `first` to the child's process group, then SIGKILL what is left after `grace` s.

    The whole group, not only the child: DataLoader workers and torchrun's ranks can outlive
    the process that started them by seconds."""
    deadline = time.monotonic() + grace
    if group_alive(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies not yet reaped count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(process_alive(pid) for pid in group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` (psutil has no group attribute: `os.getpgid` each)."""
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):  # gone since it was listed
            if os.getpgid(pid) == pgid:
                members.append(pid)
    return members


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_child(command: Sequence[str], *, on_line: Callable[[str], None],
              timeout: float | None = None, env: dict[str, str] | None = None,
              grace: float = 10.0) -> ChildOutcome:
    """Run `command`, passing each output line to `on_line`; stop its group on any exit path."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, bufsize=1, env=env,
                               process_group=0)
    # Everything after the child exists is inside the try: a SIGTERM turned into an exception
    # while the pump thread starts (milliseconds on a loaded machine) must still stop the child.
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout if timeout else None
        tail: list[str] = []
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingTimeout(f"training ran past its {timeout:g} s limit and was stopped")
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            tail = [*tail[-19:], line]
            on_line(line)
        return ChildOutcome(process.wait(), tuple(tail))
    finally:
        stop_group(process, grace)


def check_outcome(outcome: ChildOutcome) -> None:
    """Raise the error class that tells a retry policy what to do."""
    if outcome.returncode == 0:
        return
    errors = [line for line in outcome.tail if line.startswith("flowerml: error:")]
    if outcome.returncode == 2:
        raise TrainingRefused(errors[-1].removeprefix("flowerml: error: ") if errors
                              else "training refused its input (exit code 2)")
    last = outcome.tail[-1] if outcome.tail else "no output"
    raise TrainingCrashed(f"training exited with code {outcome.returncode}: {last}")


def iter_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON progress events (`flowerml train --json-progress`) among a child's lines."""
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads(line)
