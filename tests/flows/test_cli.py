"""The `flowerml` console script (flows/cli.py): the commands it registers, and the process
it ends itself after the command's exit handlers, skipping Python's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flows.cli import cli


def script_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FLOWERML_STORE": str(tmp_path / "store"),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.mark.parametrize(("args", "status", "stream", "text"), [
    (["retrain", "--epochs", "0"], 2, "stderr",
     "flowerml: error: --epochs must be at least 1 (got 0)"),
    (["retrain", "--help"], 0, "stdout", "Run the retrain flow"),
    (["runs", "list", "--json"], 0, "stdout", "[]"),  # a command that succeeds returns
])
def test_the_console_script_ends_with_the_commands_status_after_its_exit_handlers(
        tmp_path: Path, args: list[str], status: int, stream: str, text: str) -> None:
    """Run as the process's entry point (no argv), `main` ends the process itself, skipping
    Python's teardown of every object (seconds with torch loaded): the command's status, its
    whole output and every exit handler remain."""
    program = ("import atexit, sys\n"
               "atexit.register(lambda: print('exit handler ran', file=sys.stderr))\n"
               "class Late:\n"
               "    def __del__(self):\n"
               "        print('torn down', file=sys.stderr)\n"
               "late = Late()\n"
               "from flows.cli import main\n"
               f"sys.argv = ['flowerml', *{args!r}]\n"
               "main()\n"
               "print('main returned', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", program], env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-3000:]
    assert text in getattr(done, stream)
    assert done.stderr.endswith("exit handler ran\n") and "main returned" not in done.stderr
    assert "torn down" not in done.stderr  # a normal exit would have torn `late` down


def test_the_script_registers_the_commands_that_run_flows() -> None:
    """The library's group plus `retrain`, `worker`, `pools` and `score --dask-address`."""
    assert {"retrain", "worker", "pools", "train", "score"} <= set(cli.commands)
    score_options = [option for param in cli.commands["score"].params
                     for option in getattr(param, "opts", ())]
    assert "--dask-address" in score_options
    listed = CliRunner().invoke(cli, ["--help"])
    assert listed.exit_code == 0
    assert all(f"  {name} " in listed.output for name in ("retrain", "worker", "pools"))
