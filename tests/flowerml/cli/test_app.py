"""What every `flowerml` command shares: one-line errors, exit codes, and clean `--json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flowerml.cli.app import FlowermlGroup, emit_json, json_option, json_requested
from flowerml.errors import DatasetNotFound
from tests.cli_helpers import assert_refused, invoke


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
        logging.getLogger("flowerml.download").warning("download of URL failed; retry 1 of 2")
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
