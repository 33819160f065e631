"""The garbage collector's schedule in the processes flowerml's entry points own, and in no
other."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from flowerml.core.garbage import FULL_COLLECTION_EVERY, collect_long_lived_objects_rarely

PRINT_THRESHOLDS_AT_EXIT = ("import atexit, gc, sys; "
                            "atexit.register(lambda: print('thresholds', *gc.get_threshold()))")


def thresholds_at_exit(code: str, *args: str) -> tuple[int, ...]:
    """Run `code` after a hook that prints the collector's thresholds when the process exits."""
    done = subprocess.run([sys.executable, "-c", f"{PRINT_THRESHOLDS_AT_EXIT}\n{code}", *args],
                          capture_output=True, text=True, timeout=120)
    line = [row for row in done.stdout.splitlines() if row.startswith("thresholds")]
    assert line, done.stdout + done.stderr
    return tuple(int(value) for value in line[-1].split()[1:])


@pytest.fixture
def default_thresholds():
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


@pytest.mark.usefixtures("default_thresholds")
def test_only_full_collections_become_rarer():
    collect_long_lived_objects_rarely()
    assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
    assert FULL_COLLECTION_EVERY == 100 * 10


def test_importing_flowerml_or_the_console_script_keeps_the_programs_schedule():
    code = "import flowerml.cli, flows.cli, flowerml.core.garbage"
    assert thresholds_at_exit(code) == (700, 10, 10)


def test_python_m_flowerml_cli_runs_on_the_rarer_schedule():
    code = ("import runpy; sys.argv = ['flowerml', '--help']; "
            "runpy.run_module('flowerml.cli', run_name='__main__')")
    assert thresholds_at_exit(code) == (700, 10, FULL_COLLECTION_EVERY)


def test_the_console_script_runs_on_the_rarer_schedule():
    code = "from flows.cli import main; main()"
    assert thresholds_at_exit(code, "--help") == (700, 10, FULL_COLLECTION_EVERY)
