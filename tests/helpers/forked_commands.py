"""`flowerml` commands run in real child processes forked from the test's own process.

A forked child is a process of its own (its own pid, killed by SIGKILL as any other, its own
gloo sockets), but it starts with the interpreter, torch and flowerml the test process has
already imported, instead of importing them again (~3 CPU-seconds per `python -m flowerml.cli`
train or distill). Use it where the test's point is a process (a kill, two DDP ranks), not
how a fresh interpreter starts; the console script and torchrun are tested elsewhere.
Never for a child that runs autograd (training, distillation, DDP ranks): PyTorch refuses
autograd in a child forked after the parent's autograd threads started, and whether they have
depends on what ran before in the same pytest worker.

The child gets the environment it is given, stdin from /dev/null, stdout and stderr on files,
the default SIGTERM and SIGINT handling of a new interpreter, and ends with `os._exit` (never
returning into pytest), its exit status that of `flowerml`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                      "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_environment(rank: int, port: int, world_size: int = 2) -> dict[str, str]:
    """What torchrun gives each of its `world_size` local workers, for a group on
    127.0.0.1:`port`."""
    return {"TORCHELASTIC_RUN_ID": "test", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class Forked:
    """A forked child: its pid, and its stdout and stderr files once it has ended."""

    def __init__(self, pid: int, stdout: Path, stderr: Path) -> None:
        self.pid, self.stdout_path, self.stderr_path = pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Its exit status (negative: the signal that ended it); SIGKILLed past `timeout`."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"forked child {self.pid} ran past {timeout} s: "
                                   f"{self.stderr()[-2000:]}")
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL it (if still running) and reap it."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)

    def stdout(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""


def fork_call(run: Callable[[], int | None], env: dict[str, str], outputs: Path,
              name: str = "child") -> Forked:
    """`run()` in a forked child with `env` as its whole environment; its stdout and stderr
    go to `outputs`/`name`.stdout and .stderr. Its exit status is what `run` returns (0 for
    None) or the code of the SystemExit it raises; 1 with a traceback on any other error."""
    outputs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = outputs / f"{name}.stdout", outputs / f"{name}.stderr"
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # nothing buffered in this process is written twice
    pid = os.fork()
    if pid:
        return Forked(pid, stdout, stderr)
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (ended by os._exit)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        try:
            code = run() or 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def fork_flowerml(args: Sequence[str], env: dict[str, str], outputs: Path,
                  name: str = "flowerml") -> Forked:
    """`flowerml ARGS` (flowerml.cli.main, as `python -m flowerml.cli ARGS` runs it) in a
    forked child."""
    def run() -> None:
        from flowerml.cli import main

        main(list(args))

    return fork_call(run, env, outputs, name)


@contextlib.contextmanager
def reaped(children: Sequence[Forked]) -> Iterator[Sequence[Forked]]:
    """The children, each SIGKILLed and reaped on the way out if still running."""
    try:
        yield children
    finally:
        for child in children:
            child.kill()
