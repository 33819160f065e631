"""The `flowerml` console script (`flows.cli:main`): the library's commands plus those that
run or watch flows, registered here: `retrain` (flows/retrain_command.py), `worker`
(flows/worker.py), and `score --dask-address` and `pools` (flows/cli_cluster.py).

`flowerml/cli/` never imports a flow: "flows -> tasks -> flowerml" holds in the code, and
this module is where the commands that do meet the library's group.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

from flowerml.cli import cli
from flowerml.core.garbage import collect_long_lived_objects_rarely
from flows import cli_cluster  # noqa: F401  (adds `score --dask-address` and `pools`)
from flows.retrain_command import retrain
from flows.worker import build_worker_command

cli.add_command(retrain)
cli.add_command(build_worker_command())  # `flowerml worker`: drains on SIGTERM


def main(argv: list[str] | None = None) -> None:
    """The console script. Called with `argv`, it raises SystemExit as click does. Called
    without, it is the process's entry point and ends the process itself (`end_process`)."""
    if argv is not None:
        cli.main(args=argv, prog_name="flowerml")
        return
    collect_long_lived_objects_rarely()  # this process is ours (flowerml/core/garbage.py)
    try:
        cli.main(prog_name="flowerml")
    except SystemExit as done:
        end_process(done.code)
        raise
    end_process(0)  # a command that succeeds returns (flowerml's group exits only otherwise)


def end_process(code: object) -> None:
    """Exit with `code` as Python would, less its teardown of every module and object, which
    takes seconds once torch, Prefect and ONNX are loaded (measured by bench/e2e.py as
    "summary and exit"): output is flushed and the exit handlers run first. Returns (and lets
    Python exit as usual) while a non-daemon thread still runs, since Python would wait for
    it."""
    main_thread = threading.main_thread()
    if any(thread is not main_thread and not thread.daemon and thread.is_alive()
           for thread in threading.enumerate()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")  # what Python does with a non-numeric exit code
        status = 1
    flush_output()
    # The standard library has no public call that runs the exit handlers early: `atexit`
    # documents register and unregister only, and an exit handler of ours calling os._exit
    # would skip every handler registered before it (handlers run last-in, first-out).
    atexit._run_exitfuncs()  # noqa: SLF001
    flush_output()
    os._exit(status)


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
