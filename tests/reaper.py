"""Every process a pytest process starts dies with it, however that pytest process ends.

Each pytest process (the master and each xdist worker) calls `guard_this_process()` at start:

- it puts a mark of its own in its environment (`PYTEST_FLOWERML_OWNER=<pid>-<random>`), which
  every process it starts inherits, however deep, and in whatever session or process group
  (LocalPrefect's server and workers, training children, Prefect's harness server);
- it starts a watchdog (this file run as a script) in a session of its own and without the mark.
  Once its pytest process is gone (normal end, Ctrl-C, SIGTERM, SIGKILL), the watchdog SIGKILLs
  every process whose starting environment (/proc/PID/environ) carries that mark, then exits;
- SIGTERM to pytest stops it as Ctrl-C does (fixture finalizers run); a second one ends it at
  once (the watchdog then stops what the finalizers had not). An xdist master passes the SIGTERM
  on to its workers, so that theirs run too.

A child of a worker carries the worker's mark, and the worker itself the master's: the master's
watchdog kills the workers, and each worker's watchdog kills what that worker started. A process
that a test starts with an environment not derived from os.environ is out of reach: start
children with `env={**os.environ, ...}` (or no env).

Linux only (/proc); elsewhere the watchdog has nothing to read and kills nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

OWNER_VARIABLE = "PYTEST_FLOWERML_OWNER"
"""Not FLOWERML_*: tests that clear flowerml's settings from the environment keep the mark."""

POLL_SECONDS = 0.25
REAP_SECONDS = 10.0
"""How long the watchdog keeps killing (a process may fork while it is being killed)."""
STOP_GRACE_SECONDS = 60.0
"""After a SIGTERM, how long pytest may spend on finalizers before it is ended regardless."""

_guarded: dict[str, object] = {}
"""This process's mark and watchdog once guarded (a forked child starts unguarded)."""


def guard_this_process(*, pass_sigterm_to_children: bool = False) -> str:
    """Mark this pytest process's environment, start its watchdog and make SIGTERM a clean stop;
    returns the mark. `pass_sigterm_to_children`: for an xdist master, whose children are its
    workers."""
    if _guarded.get("pid") == os.getpid():
        return str(_guarded["mark"])
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[OWNER_VARIABLE] = mark
    _guarded.update(pid=os.getpid(), mark=mark, watchdog=start_watchdog(os.getpid(), mark))
    if threading.current_thread() is threading.main_thread():
        answer_sigint_as_from_a_terminal()
        stop_cleanly_on_sigterm(mark if pass_sigterm_to_children else None)
    return mark


def answer_sigint_as_from_a_terminal() -> None:
    """Python's own SIGINT handling in this process, also when it started with SIGINT ignored (a
    shell's background job, some CI runners): the ignoring passes on to every process a test
    starts, so a stand-in server that stops on SIGINT, as Prefect's does, would sit out the whole
    grace period of a stop (40 s of one test) instead."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def start_watchdog(owner_pid: int, mark: str) -> subprocess.Popen:
    """This file as a script, watching `owner_pid` (its parent) from a session of its own, so
    that neither Ctrl-C at a terminal nor a kill of pytest's process group reaches it."""
    env = {name: value for name, value in os.environ.items() if name != OWNER_VARIABLE}
    return subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__),
                             str(owner_pid), mark], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)


def stop_cleanly_on_sigterm(forward_mark: str | None) -> None:
    """SIGTERM raises KeyboardInterrupt in this process (pytest then stops as on Ctrl-C); a
    second SIGTERM, or one reaching a forked copy of this process, ends it as SIGTERM would."""
    owner = os.getpid()
    stopping = threading.Event()

    def on_sigterm(signum: int, _frame: object) -> None:
        if os.getpid() != owner or stopping.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        stopping.set()
        if forward_mark is not None:
            for pid in owned_processes(forward_mark, parent=owner):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        threading.Thread(target=_end_after_grace, args=(owner,), daemon=True).start()
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    _guarded["sigterm"] = on_sigterm
    _guarded["sigint"] = signal.getsignal(signal.SIGINT)


def _end_after_grace(owner: int) -> None:
    time.sleep(STOP_GRACE_SECONDS)
    os.kill(owner, signal.SIGKILL)  # finalizers hung: the watchdog stops what they left


def restore_signal_handlers() -> None:
    """Put back this process's SIGTERM and SIGINT handlers if a test replaced them in-process
    (e.g. a command run through CliRunner that installs its own and leaves them)."""
    if _guarded.get("pid") != os.getpid() or "sigterm" not in _guarded:
        return
    for signum, handler in ((signal.SIGTERM, _guarded["sigterm"]),
                            (signal.SIGINT, _guarded["sigint"])):
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


def owned_processes(mark: str, parent: int | None = None) -> list[int]:
    """Live processes whose starting environment carries `mark` (only `parent`'s children if
    given). A zombie's environment reads empty, so the dead are left out."""
    entry = f"{OWNER_VARIABLE}={mark}".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry not in environ.read().split(b"\0"):
                    continue
            if parent is not None and _parent_of(name) != parent:
                continue
        except OSError:  # gone meanwhile, or another user's
            continue
        found.append(int(name))
    return found


def _parent_of(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def reap(mark: str, seconds: float = REAP_SECONDS) -> None:
    """SIGKILL every process carrying `mark` until none is left (or `seconds` pass)."""
    deadline = time.monotonic() + seconds
    while (owned := owned_processes(mark)) and time.monotonic() < deadline:
        for pid in owned:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def watch(owner_pid: int, mark: str) -> None:
    """Wait for `owner_pid`, this process's parent, to end, then reap its mark. The parent
    check cannot be fooled by a reused pid: an orphan is handed to another parent at once."""
    while os.getppid() == owner_pid:
        time.sleep(POLL_SECONDS)
    reap(mark)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only its owner's end may stop it early
    watch(int(sys.argv[1]), sys.argv[2])
