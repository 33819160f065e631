"""What every `flowerml` command shares: one-line errors, exit codes, and clean `--json`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flowerml.cli.app import (
    FlowermlGroup,
    emit_json,
    json_option,
    json_requested,
    raise_if_stop_was_lost,
)
from flowerml.core.errors import DatasetNotFound
from tests.helpers.cli import assert_refused, invoke


def build_group() -> click.Group:
    """A throwaway group with the real error handling, whose commands misbehave on purpose."""
    @click.group(cls=FlowermlGroup)
    def group() -> None:
        pass

    @group.command()
    @json_option
    def chatty(as_json: bool) -> None:
        print("Downloading: a library talking on stdout")
        click.echo("a human line")
        emit_json({"ok": True})

    @group.command()
    @json_option
    def buggy(as_json: bool) -> None:
        raise ZeroDivisionError("a bug")

    @group.command()
    @json_option
    def missing(as_json: bool) -> None:
        raise DatasetNotFound("dataset 'roses' is not published on ./store")

    @group.command()
    def warns() -> None:
        logging.getLogger("flowerml.io.download").warning("download of URL failed; retry 1 of 2")
        click.echo("done")

    @group.command()
    @click.argument("path")
    @json_option
    def read(path: str, as_json: bool) -> None:
        Path(path).read_bytes()

    return group


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(build_group(), list(args))


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_json_stdout_holds_only_json_even_when_a_library_prints() -> None:
    result = run("chatty", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"ok": True}]
    assert "Downloading: a library talking on stdout" in result.stderr
    assert "a human line" in result.stderr


def test_without_json_human_text_stays_on_stdout() -> None:
    result = run("chatty")
    assert "a human line" in result.stdout
    assert "Downloading:" in result.stdout


def test_a_library_error_is_one_line_and_a_json_error_with_its_kind() -> None:
    result = run("missing", "--json")
    assert_refused(result, "dataset 'roses' is not published")
    assert last_json_line(result.stdout) == {
        "error": "dataset 'roses' is not published on ./store", "kind": "not-found"}


def test_a_usage_error_with_json_says_bad_input() -> None:
    result = run("missing", "--json", "--bogus")
    assert_refused(result, "No such option '--bogus'")
    assert last_json_line(result.stdout)["kind"] == "bad-input"


def test_an_unusable_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    result = run("read", str(missing), "--json")
    assert_refused(result, f"{missing}: No such file or directory")
    assert last_json_line(result.stdout)["kind"] == "not-found"


def test_a_bug_keeps_its_traceback_and_json_still_ends_in_an_error_line() -> None:
    result = run("buggy", "--json")
    assert isinstance(result.exception, ZeroDivisionError)
    assert last_json_line(result.stdout) == {"error": "internal error: ZeroDivisionError: a bug",
                                             "kind": "internal"}


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--json"], True),
    (["train", "--", "--json"], False),
    (["train", "--json-progress"], False),
])
def test_json_requested(args: list[str], expected: bool) -> None:
    assert json_requested(args) is expected


def test_top_level_usage_errors_are_one_line() -> None:
    assert_refused(invoke("bogus-command"), "No such command 'bogus-command'")
    assert_refused(invoke("--bogus"), "No such option '--bogus'")


def test_every_option_of_every_command_has_help() -> None:
    from flowerml.cli import cli

    def commands(group: click.Group, prefix: str = ""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    missing = [f"{name} {param.opts[0]}" for name, command in commands(cli)
               for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not param.help]
    assert missing == []


def test_library_warnings_are_flowerml_warning_lines_on_stderr() -> None:
    result = run("warns")
    assert result.exit_code == 0
    assert result.stderr == "flowerml: warning: download of URL failed; retry 1 of 2\n"
    assert result.stdout == "done\n"


# --------------------------------------------------------------------------------------------
# SIGTERM: what systemd, Kubernetes, `timeout` and a launcher stopping its child send


def build_stoppable_group(tidied: list[str]) -> click.Group:
    @click.group(cls=FlowermlGroup)
    def group() -> None:
        pass

    @group.command()
    @json_option
    def works(as_json: bool) -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the signal arrives during the work
        finally:
            tidied.append("finally ran")

    return group


@pytest.mark.parametrize("as_json", [False, True])
def test_sigterm_unwinds_the_command_and_says_so_in_one_line(as_json: bool) -> None:
    tidied: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    result = CliRunner().invoke(build_stoppable_group(tidied),
                                ["works", *(["--json"] if as_json else [])])
    assert time.monotonic() - started < 5
    assert result.exit_code == 143
    assert result.stderr == "flowerml: error: stopped by SIGTERM\n"
    assert result.stdout == ('{"error": "stopped by SIGTERM", "kind": "stopped"}\n'
                             if as_json else "")
    assert tidied == ["finally ran"]
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone after it


def test_a_command_that_takes_sigterm_over_keeps_it_until_the_process_ends() -> None:
    """`flowerml worker` drains on SIGTERM with its own handler: put back to the default when
    the command returned, a second SIGTERM during the process's exit killed it (-15) after a
    clean drain. A command that leaves SIGTERM alone gets the handler it found back (above)."""
    before = signal.getsignal(signal.SIGTERM)
    requests: list[int] = []

    def own(signum: int, _frame: object) -> None:
        requests.append(signum)

    @click.group(cls=FlowermlGroup)
    def group() -> None:
        pass

    @group.command()
    def drains() -> None:
        signal.signal(signal.SIGTERM, own)

    try:
        result = CliRunner().invoke(group, ["drains"])
        assert result.exit_code == 0, result.output
        assert signal.getsignal(signal.SIGTERM) is own
        os.kill(os.getpid(), signal.SIGTERM)  # the second SIGTERM, after the command
        time.sleep(0.1)
        assert requests == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_python_drops_in_a_finaliser_still_stops_the_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python drops an exception raised in a weakref callback (import's module-lock cleanup
    runs one at any moment): a SIGTERM handled there once let `flowerml train` run on to its
    end and exit 0. The next step raises it again, and the command stops as usual."""
    steps: list[int] = []
    dropped: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_value))

    @click.group(cls=FlowermlGroup)
    def group() -> None:
        pass

    @group.command()
    def loses() -> None:
        class Owner:
            pass

        def finaliser() -> None:  # the signal arrives while this runs, and is dropped
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(100_000))

        owner = Owner()
        weakref.finalize(owner, finaliser)
        del owner
        for step in range(50):
            raise_if_stop_was_lost()  # what each epoch's event does
            steps.append(step)

    result = CliRunner().invoke(group, ["loses"])
    assert [type(error).__name__ for error in dropped] == ["StoppedBySignal"]  # Python did
    assert result.exit_code == 143, result.output
    assert result.stderr.splitlines()[-1] == "flowerml: error: stopped by SIGTERM"
    assert steps == []


def command_process(args: list[str], env: dict[str, str],
                    code: str | None = None) -> subprocess.Popen:
    """`flowerml ARGS` in its own interpreter (`code`: a script that patches, then runs it)."""
    start = ["-c", code] if code else ["-m", "flowerml.cli"]
    return subprocess.Popen([sys.executable, *start, *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_with_sigterm(process: subprocess.Popen) -> tuple[str, list[str]]:
    """SIGTERM, then (stdout, stderr lines) once it exited 143 with one error line, last."""
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 143, stderr[-3000:]
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    assert [line for line in lines if line.startswith("flowerml: error:")] == \
        ["flowerml: error: stopped by SIGTERM"] == lines[-1:], stderr[-3000:]
    return stdout, lines


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


@pytest.mark.slow  # a training process stopped by SIGTERM
def test_sigterm_stops_train_with_one_line_and_json(local_published, local_store,
                                                    tmp_path: Path) -> None:
    run = local_store.root / "runs" / "stopped"
    process = command_process(
        ["train", "--recipe", "demo", "--arch", "mobilenet_v3_small", "--epochs", "200",
         "--image-size", "40", "--device", "cpu", "--workers", "0", "--run-id", "stopped",
         "--json"],
        {"FLOWERML_STORE": str(local_store.root), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    wait_until(lambda: (run / "checkpoint.json").exists(), process, "a first checkpoint")
    stdout, lines = stop_with_sigterm(process)
    assert lines[0] == "flowerml: run stopped (resume it with: flowerml train --run-id stopped)"
    assert [json.loads(line) for line in stdout.splitlines()] == [
        {"error": "stopped by SIGTERM", "kind": "stopped"}]
    assert sorted(local_store.root.rglob(".tmp-*")) == []  # no half-written checkpoint


# `flowerml` whose shards take half a second more each, so a test can stop it between them.
SLOW_SHARDS = """
import sys, time
from flowerml.serving import scoring
score_shard = scoring.score_shard
def score_slowly(*args, **kwargs):
    time.sleep(0.5)
    return score_shard(*args, **kwargs)
scoring.score_shard = score_slowly
from flowerml.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # a scoring process stopped by SIGTERM
def test_sigterm_stops_score_with_one_line_and_no_success_record(registered_run,
                                                                 tmp_path: Path) -> None:
    images = next(registered_run.cache.rglob("*.jpg")).parents[2]  # the dataset version
    output = tmp_path / "scores"
    process = command_process(
        ["score", str(images), "--output", str(output), "--shard-size", "2", "--runtime",
         "torch", "--json"],
        {"FLOWERML_STORE": str(registered_run.store.root),
         "FLOWERML_CACHE_DIR": str(tmp_path / "c")}, code=SLOW_SHARDS)
    wait_until(lambda: any(output.rglob("part-*.jsonl")), process, "a first part file")
    stdout, _ = stop_with_sigterm(process)
    assert [json.loads(line) for line in stdout.splitlines()] == [
        {"error": "stopped by SIGTERM", "kind": "stopped"}]
    assert not list(output.rglob("_SUCCESS.json"))
    assert sorted(output.rglob(".tmp-*")) == []


def test_torchs_kernel_reregistration_warning_is_not_shown() -> None:
    """torch's warning about installing its own aten::bmm kernel twice (two threads importing
    torch at once) is hidden by any flowerml command; other warnings still show."""
    invoke("--help")
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn("Warning only once for all operators,  other operators may also be "
                      "overridden.\n  Overriding a previously registered kernel", UserWarning,
                      stacklevel=1)
        warnings.warn("a warning of flowerml's own", UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in shown] == ["a warning of flowerml's own"]
