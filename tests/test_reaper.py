"""tests/reaper.py: a server a test starts dies with the pytest process that started it, however
that process ends (SIGTERM, SIGKILL, of a plain pytest, an xdist master or an xdist worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowerml.core.launch import process_alive
from tests import reaper

REPO = Path(__file__).resolve().parents[1]

SERVING_TEST = '''
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

PROBE = Path(os.environ["REAPER_PROBE_DIR"])


@pytest.fixture
def finalized():
    yield
    (PROBE / "finalized").touch()


def test_serves_then_sleeps(finalized):
    # A session of its own, as LocalPrefect's servers: killing pytest's group would miss it.
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind",
                               "127.0.0.1"], stdout=subprocess.PIPE, start_new_session=True)
    assert server.stdout.readline().startswith(b"Serving HTTP on 127.0.0.1")
    (PROBE / "pids.tmp").write_text(json.dumps({"pytest": os.getpid(), "server": server.pid}))
    (PROBE / "pids.tmp").rename(PROBE / "pids.json")
    time.sleep(120)
'''


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


def start_nested_pytest(tmp_path: Path, *options: str) -> tuple[subprocess.Popen, dict, Path]:
    """A pytest session on SERVING_TEST with this suite's conftest hooks, once its test's
    server answers: (the pytest process, {"pytest": pid running the test, "server": pid}, its
    output file)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # its own rootdir, not this repository
    (tmp_path / "test_serving.py").write_text(SERVING_TEST)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST_")}  # an outer xdist worker's, not its own
    # The plugins this suite runs with (xdist, pytest-timeout, whose ini option the conftest
    # reads) named, not every installed one loaded: anyio's, which httpx brings along, costs each
    # nested pytest process (and its xdist worker) about 0.2 CPU-s of imports.
    env.update(REAPER_PROBE_DIR=str(tmp_path), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]))
    output = tmp_path / "output.txt"
    with open(output, "wb") as out:
        nested = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist",
             "-p", "pytest_timeout", "-p", "tests.conftest",
             f"--basetemp={tmp_path / 'basetemp'}", *options, "test_serving.py"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    pids_file = tmp_path / "pids.json"
    try:
        wait_until(lambda: pids_file.exists() or nested.poll() is not None, 90,
                   "the nested test's server")
        assert nested.poll() is None, output.read_text()
    except BaseException:
        nested.kill()
        nested.wait()
        raise
    return nested, json.loads(pids_file.read_text()), output


def assert_all_gone(nested: subprocess.Popen, pids: dict, output: Path) -> None:
    try:
        wait_until(lambda: not any(map(process_alive, pids.values())), 20,
                   f"the end of {pids}")
        nested.wait(timeout=60)
    finally:
        for pid in [nested.pid, *pids.values()]:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if nested.poll() is None:
            nested.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("options", "signum", "exit_code", "finalized"), [
    ([], signal.SIGTERM, pytest.ExitCode.INTERRUPTED, True),
    ([], signal.SIGKILL, -signal.SIGKILL, False),
    (["-n", "1"], signal.SIGTERM, pytest.ExitCode.INTERRUPTED, True),  # passed on to the worker
    (["-n", "1"], signal.SIGKILL, -signal.SIGKILL, False),
], ids=["sigterm", "sigkill", "xdist-sigterm", "xdist-sigkill"])
def test_a_stopped_pytest_leaves_no_server(tmp_path: Path, options: list[str], signum: int,
                                           exit_code: int, finalized: bool) -> None:
    """The signal reaches the pytest process the command started (with -n, the master only);
    SIGTERM stops it as Ctrl-C does, fixture finalizers included."""
    nested, pids, output = start_nested_pytest(tmp_path, *options)
    assert (pids["pytest"] == nested.pid) == (not options)
    os.kill(nested.pid, signum)
    assert_all_gone(nested, pids, output)
    assert nested.returncode == exit_code, output.read_text()
    assert (tmp_path / "finalized").exists() == finalized


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "exit_code", "finalized"), [
    (signal.SIGTERM, pytest.ExitCode.INTERRUPTED, True),
    (signal.SIGKILL, pytest.ExitCode.TESTS_FAILED, False),
], ids=["sigterm", "sigkill"])
def test_a_stopped_xdist_worker_leaves_no_server(tmp_path: Path, signum: int, exit_code: int,
                                                 finalized: bool) -> None:
    """The master reports the worker's test as crashed (and stops, on SIGTERM, as on Ctrl-C)."""
    nested, pids, output = start_nested_pytest(tmp_path, "-n", "1")
    os.kill(pids["pytest"], signum)
    assert_all_gone(nested, pids, output)
    assert nested.returncode == exit_code, output.read_text()
    assert "worker 'gw0' crashed while running 'test_serving.py::test_serves_then_sleeps'" in (
        output.read_text())
    assert (tmp_path / "finalized").exists() == finalized


def test_this_process_is_guarded_and_only_its_own_processes_are_its() -> None:
    """The hook ran here: a mark of this process's own, a watchdog without it in a session of
    its own, and the mark finds a child that inherits it but not one started without it."""
    mark = os.environ[reaper.OWNER_VARIABLE]
    assert mark.startswith(f"{os.getpid()}-")
    watchdogs = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if f"{os.getpid()} {mark}".encode() in Path(f"/proc/{pid}/cmdline")
                 .read_bytes().replace(b"\0", b" ")]
    assert len(watchdogs) == 1 and os.getsid(watchdogs[0]) == watchdogs[0]
    assert watchdogs[0] not in reaper.owned_processes(mark)
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    unmarked_env = {k: v for k, v in os.environ.items() if k != reaper.OWNER_VARIABLE}
    with subprocess.Popen(sleep) as marked, subprocess.Popen(sleep, env=unmarked_env) as unmarked:
        try:
            owned = reaper.owned_processes(mark)
            assert marked.pid in owned and unmarked.pid not in owned
            assert marked.pid in reaper.owned_processes(mark, parent=os.getpid())
        finally:
            marked.kill()
            unmarked.kill()


def test_a_pytest_started_with_sigint_ignored_starts_processes_that_stop_on_it() -> None:
    """As a shell's background job starts pytest: the ignoring would pass on to the servers the
    tests start, and a stop that begins with SIGINT would wait out its grace period."""
    ours = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        reaper.answer_sigint_as_from_a_terminal()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as child:
            assert child.stdout.readline() == b"up\n"
            child.send_signal(signal.SIGINT)
            try:
                assert child.wait(timeout=30) != 0
            finally:
                child.kill()
            assert b"KeyboardInterrupt" in child.stderr.read()
    finally:
        signal.signal(signal.SIGINT, ours)


def test_a_test_that_replaces_the_signal_handlers_gets_them_back() -> None:
    """As `flowerml retrain` run through CliRunner does: the next test's SIGTERM still stops
    pytest cleanly."""
    ours = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reaper.restore_signal_handlers()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == ours
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
