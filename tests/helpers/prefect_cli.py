"""Many `prefect ...` (and `python SCRIPT.py ...`) commands run by one interpreter, in order.

Each `prefect` process spends ~1.5-2 CPU-s importing Prefect before it does anything; the
runbook test runs about forty commands. `CommandBatch` starts one child (this module, with the
environment and working folder the commands would have had) that imports Prefect once and runs
each command through the same entry point as the `prefect` console script
(`prefect.cli.app` with `sys.argv` set), or a script through `runpy` as `python SCRIPT` runs
it; the exit code and everything the command printed come back per command.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple


class Outcome(NamedTuple):
    returncode: int
    output: str  # stdout and stderr together, as a terminal shows them


class CommandBatch:
    """The child process; `run(["prefect", ...])` or `run(["python", "x.py", ...])`."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.helpers.prefect_cli"],
                                        env=env, cwd=cwd, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str]) -> Outcome:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, f"the command batch died running {argv}"
        return Outcome(**json.loads(reply))

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)

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
        elif program == "python" and args and args[0].endswith(".py"):
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
        else:
            raise ValueError(f"not a prefect or python SCRIPT command: {argv}")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


def serve() -> None:
    """Read commands (one JSON list a line), answer {"returncode", "output"} a line each."""
    replies = sys.stdout
    for line in sys.stdin:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = run_one(json.loads(line))
            except Exception:  # a crash is the command's own output, as in a terminal
                import traceback

                traceback.print_exc()
                code = 1
        replies.write(json.dumps({"returncode": code, "output": captured.getvalue()}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
