"""Many `prefect ...` (and `flowerml ...`, `python SCRIPT.py ...`, `python -c CODE`) commands
run by one interpreter, in order.

Each `prefect` or `flowerml` process spends ~0.4-2 CPU-s importing Prefect or our CLI before it
does anything; the runbook test runs about fifty commands, the deployment tests a dozen.
`CommandBatch` starts one child (this module, with the environment and working folder the
commands would have had) that imports each once and runs each command through the same entry
point as its console script (`prefect.cli.app` with `sys.argv` set, `flows.cli.main` with the
arguments), a script through `runpy` as `python SCRIPT` runs it, or `python -c CODE` as
`__main__`; the exit code, everything the command printed, and what of it went to stderr come
back per command.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import select
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple


class Outcome(NamedTuple):
    returncode: int
    output: str  # stdout and stderr together, as a terminal shows them
    errors: str  # what of `output` went to stderr


class CommandBatch:
    """The child process; `run(["prefect", ...])`, `run(["flowerml", ...])`,
    `run(["python", "x.py", ...])` or `run(["python", "-c", CODE])`."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.helpers.prefect_cli"],
                                        env=env, cwd=cwd, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], timeout: float = 300) -> Outcome:
        """Run one command; a command still running after `timeout` s ends the batch."""
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        # Each reply is one line read whole, so nothing waits in the pipe's buffer here.
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            self.process.wait()
            raise TimeoutError(f"{argv} still running after {timeout:g} s")
        reply = self.process.stdout.readline()
        assert reply, f"the command batch died running {argv}"
        return Outcome(**json.loads(reply))

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> CommandBatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def run_one(argv: list[str]) -> int:
    """One command in this interpreter; its exit code as the shell would see it."""
    program, *args = argv
    try:
        if program == "prefect":
            from prefect.cli import app

            sys.argv = ["prefect", *args]
            app()
        elif program == "flowerml":
            from flows.cli import main

            main(args)  # click's standalone mode: ends in SystemExit, as the script does
        elif program == "python" and len(args) == 2 and args[0] == "-c":
            sys.argv = ["-c"]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
        elif program == "python" and args and args[0].endswith(".py"):
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
        else:
            raise ValueError(f"not a prefect, flowerml or python SCRIPT/-c command: {argv}")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


class Both(io.TextIOBase):
    """Writes to two streams: stderr goes to the terminal's view and to its own."""

    def __init__(self, *streams: io.StringIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


def serve() -> None:
    """Read commands (one JSON list a line), answer {"returncode", "output", "errors"} a line
    each."""
    replies = sys.stdout
    for line in sys.stdin:
        output, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(Both(output, errors)):
            try:
                code = run_one(json.loads(line))
            except Exception:  # a crash is the command's own output, as in a terminal
                import traceback

                traceback.print_exc()
                code = 1
        replies.write(json.dumps({"returncode": code, "output": output.getvalue(),
                                  "errors": errors.getvalue()}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
