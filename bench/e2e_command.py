"""The e2e benchmark's processes: one command run with every process traced, in a clean
environment, and Prefect's database created once before the first timed run.

A traced run's processes see only what the case sets: no FLOWERML_, PREFECT_ or AWS_ variable of
this shell; PYTHONPATH starts with the tracer's sitecustomize folder and the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import progress_log
from e2e_tracer import TRACE_ENV, write_sitecustomize

log = progress_log("bench-e2e")


def clean_environment() -> dict[str, str]:
    """This process's environment without any flowerml, Prefect API or AWS setting: a traced
    run uses only what the case sets."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("FLOWERML_", "PREFECT_", "AWS_"))}


def python_path(*first: Path) -> str:
    """PYTHONPATH with `first` ahead of what it held (where extra packages may live)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*(str(p) for p in first), *rest])


def console_script() -> list[str]:
    """The `flowerml` console script `make demo` runs (the venv's), as a command."""
    script = Path(sys.executable).parent / "flowerml"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def run_traced(command: list[str], *, cwd: Path, code_root: Path, env: dict[str, str],
               timeout: float) -> dict:
    """Run `command` with every process traced; its wall time, outputs and trace events."""
    sitedir = write_sitecustomize(cwd / ".e2e-site")
    trace = cwd / "trace.jsonl"
    trace.unlink(missing_ok=True)
    env = {**clean_environment(), **env, TRACE_ENV: str(trace),
           "PYTHONPATH": python_path(sitedir, code_root)}
    # Files, not pipes: the command has ended when its process exits (as a shell sees it),
    # not when the last process that inherited its output closes it.
    with open(cwd / "stdout.txt", "w+") as stdout, open(cwd / "stderr.txt", "w+") as stderr:
        started = time.time()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                   text=True)
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
        ended = time.time()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    events = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    return {"trigger": started, "exit": ended, "returncode": returncode,
            "stdout": out, "stderr": err, "events": events}


def warm_prefect_database(prefect_home: Path) -> None:
    """Create Prefect's database once, untimed (a user pays this on the very first run only)."""
    if any(prefect_home.glob("*.db")):
        return
    log(f"creating Prefect's database in {prefect_home} (untimed, once)")
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**clean_environment(), "PREFECT_HOME": str(prefect_home)}
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
