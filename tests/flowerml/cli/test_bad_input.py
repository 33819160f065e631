"""Every subcommand's bad input, as a user types it: one `flowerml: error:` line naming the
thing, exit code 2, no traceback; and with --json, stdout holds only JSON and ends with
{"error", "kind"}. Runs the console script's group (flows.cli), so `retrain` is in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from flows.cli import cli
from tests.helpers.cli import assert_refused
from tests.helpers.synthetic import RegisteredRun

# (arguments, a fragment the one error line must hold). {src}: a synthetic source folder,
# {img}: an image, {tmp}: a fresh folder holding latin1.txt (a list that is not UTF-8),
# {fifo}: a named pipe called fifo.pth, {fifolist}: one called pipe.txt; the store is the
# registered run's (flowers102:1).
CASES: list[tuple[list[str], str]] = [
    (["synth", "/proc/flowerml-nope"], "/proc/flowerml-nope"),
    (["synth", "{tmp}/s", "--classes", "0"], "--classes"),
    (["synth", "{src}"], "already exists (--force overwrites it)"),
    (["synth", "{tmp}/s", "--image-size", "100000"],
     "--image-size must be between 32 and 4096 (got 100000)"),
    (["synth", "{tmp}/s", "--per-class", "10000000000"], "--per-class must be between 3 and"),
    (["ingest", "--source", "ftp://mirror/flowers"], "ftp://"),
    (["ingest", "--source", ""], "--source"),
    (["ingest", "--source", "https://"], "--source"),
    (["ingest", "--source", "s3://"], "--source"),
    (["ingest", "--source", "{tmp}/missing"], "does not exist"),
    (["ingest", "--source", "{src}", "--store", "s3://Bad_Bucket!/x"], "Bad_Bucket"),
    (["ingest", "--source", "{src}/setid.mat"], "is a file, not a folder"),
    (["ingest", "--workers", "0"], "--workers"),
    (["train", "--arch", "bogus"], "--arch must be one of"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--run-id", "../x"], "--run-id"),
    (["train", "--config", "{{"], "training config"),
    (["train", "--recipe", "demo", "--dataset", "roses", "--device", "cpu"], "roses"),
    (["evaluate", "--run", "missing"], "run 'missing' not found"),
    (["evaluate", "--run", "tiny", "--split", "bogus"], "--split must be one of"),
    (["predict", "{img}", "--model", "tulips"], "tulips"),
    (["predict", "{img}", "--top-k", "0"], "--top-k"),
    (["predict", "{img}", "--model", "flowers102", "--run", "tiny"], "not both"),
    (["score", "{fifolist}", "--output", "{tmp}/out"],
     "pipe.txt: is a FIFO (named pipe), not a regular file"),
    (["score", "{tmp}/latin1.txt", "--output", "{tmp}/out"],
     "latin1.txt: line 2 is not UTF-8 text; save the list as UTF-8"),
    (["score", "/dev/zero", "--output", "{tmp}/out"],
     "INPUT /dev/zero: is a character device, not a regular file"),
    (["export", "flowers102@staging"], "no alias 'staging'"),
    (["export", "flowers102", "--opset", "9"], "--opset"),
    (["registry", "list", "--store", "ftp://x"], "--store"),
    (["registry", "show", "tulips"], "model 'tulips' has no versions"),
    (["registry", "promote", "flowers102", "99"], "no version 000099"),
    (["registry", "promote", "flowers102", "1", "--threshold", "2"], "--threshold"),
    (["registry", "rollback", "tulips"], "tulips"),
    (["registry", "history", "flowers102", "--alias", "staging"], "no alias 'staging'"),
    (["registry", "register", "--run", "missing"], "missing"),
    (["runs", "show", "missing"], "run 'missing' not found"),
    (["runs", "delete", "missing"], "run 'missing' not found"),
    (["runs", "show", "../x"], "../x"),
    (["datasets", "show", "roses"], "roses"),
    (["datasets", "show", "Bad Name"], "Bad Name"),
    (["retrain", "--arch", "bogus"], "--arch must be one of"),
    (["retrain", "--threshold", "2"], "--threshold"),
    (["retrain", "--class-drop", "-0.5"], "--class-drop"),
    (["retrain", "--source", "ftp://mirror/flowers"], "ftp://"),
    # An empty value is refused naming it, never read as "not given" (flowerml.cli.app).
    (["train", "--run-id", ""], "--run-id must not be empty"),
    (["predict", "{img}", "--model", ""], "--model must not be empty"),
    (["evaluate", "--run", "tiny", "--dataset-version", ""],
     "--dataset-version must not be empty"),
    (["synth", ""], "OUT_DIR must not be empty"),
    (["datasets", "show", ""], "NAME must not be empty"),
    (["registry", "show", " "], "NAME must not be empty"),
    (["score", "", "--output", "{tmp}/out"], "INPUT must not be empty"),
    (["retrain", "--store", ""], "--store must not be empty"),
    # The words name what the user typed, and say what is wrong.
    (["predict", "{img}", "--run", "../x"], "--run must be letters, digits"),
    (["evaluate", "--run", "../x"], "--run must be letters, digits"),
    (["train", "--weights", "ftp://x/w.pth"],
     "--weights ftp://x/w.pth: the scheme 'ftp' is not supported: give none, imagenet"),
    (["train", "--weights", "{fifo}"], "fifo.pth is not a regular file (a named pipe)"),
    (["registry", "promote", "flowers102", "-1"],
     "VERSION must be a positive number (1, 2, ...): got '-1'"),
    (["registry", "promote", "flowers102", "0"], "VERSION must be a positive number"),
]

# The `kind` of a refusal, where one could be mistaken for another.
KINDS: list[tuple[list[str], str]] = [
    (["evaluate", "--run", "nosuch"], "not-found"),
    (["predict", "{img}", "--run", "nosuch"], "not-found"),
    (["runs", "show", "nosuch"], "not-found"),
    (["train", "--run-id", ""], "bad-input"),
]


@pytest.fixture
def fill(registered_run: RegisteredRun, synthetic_source: Path, tmp_path: Path):
    image = next(registered_run.cache.rglob("*.jpg"))
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)  # opened by a reader, it would block until a writer came
    fifo_list = tmp_path / "pipe.txt"
    os.mkfifo(fifo_list)
    (tmp_path / "latin1.txt").write_bytes(b"a.jpg\nf\xe9e.jpg\n")

    def fill(args: list[str]) -> list[str]:
        return [a.format(src=synthetic_source, img=image, tmp=tmp_path, fifo=fifo,
                         fifolist=fifo_list) for a in args]
    return fill


def run(args: list[str], registered_run: RegisteredRun, tmp_path: Path) -> Result:
    env = {"FLOWERML_STORE": str(registered_run.store.root),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache")}
    return CliRunner().invoke(cli, args, env=env)


def case_id(case: tuple[list[str], str]) -> str:
    return " ".join(case[0])[:60]


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_bad_input_is_one_line_and_exit_2(case, fill, registered_run: RegisteredRun,
                                           tmp_path: Path) -> None:
    args, message = case
    assert_refused(run(fill(args), registered_run, tmp_path), message)
    assert not (tmp_path / "s").exists() and not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_with_json_stdout_is_only_json_ending_in_the_error(case, fill,
                                                           registered_run: RegisteredRun,
                                                           tmp_path: Path) -> None:
    args, message = case
    result = run([*fill(args), "--json"], registered_run, tmp_path)
    assert_refused(result, message)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and set(rows[-1]) == {"error", "kind"}, result.stdout
    assert message in rows[-1]["error"]
    assert rows[-1]["kind"] in {"bad-input", "not-found", "refused", "denied", "unavailable"}


def test_the_cache_dir_and_a_dotenv_that_is_not_utf8(registered_run: RegisteredRun,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    env = {"FLOWERML_STORE": str(registered_run.store.root),
           "FLOWERML_CACHE_DIR": str(tmp_path / "a-file")}
    assert_refused(CliRunner().invoke(cli, ["runs", "list"], env=env), "FLOWERML_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"FLOWERML_DATASET=\xff\xfe\n")
    env["FLOWERML_CACHE_DIR"] = str(tmp_path / "cache")
    assert_refused(CliRunner().invoke(cli, ["datasets", "list"], env=env), ".env")


def test_a_decompression_bomb_is_its_own_row_not_a_traceback(registered_run: RegisteredRun,
                                                             tmp_path: Path) -> None:
    from tests.helpers.images import write_png_header

    # 900 megapixels by its header, which is all PIL reads to refuse it (writing the whole
    # image would cost a second of PNG compression)
    bomb = write_png_header(tmp_path / "bomb.png", 30_000, 30_000)
    result = run(["predict", str(bomb), "--json"], registered_run, tmp_path)
    assert result.exit_code == 1  # predict's rule: a failed input is a row, and exit 1
    assert "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1 and "too large" in result.stderr
    assert json.loads(result.stdout)["error"].startswith("too large to decode safely")


@pytest.mark.parametrize("case", KINDS, ids=map(case_id, KINDS))
def test_the_json_kind_says_what_went_wrong(case, fill, registered_run: RegisteredRun,
                                            tmp_path: Path) -> None:
    args, kind = case
    result = run([*fill(args), "--json"], registered_run, tmp_path)
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == kind


def text_parameters() -> list[tuple[list[str], str]]:
    """Every text option and argument of every command: (arguments giving it '', its name)."""
    import click

    from flowerml.cli.app import NotEmpty, parameter_name

    found = []

    def walk(group: click.Group, path: list[str]) -> None:
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                walk(command, [*path, name])
                continue
            arguments = [p for p in command.params if isinstance(p, click.Argument)]
            for param in command.params:
                if not isinstance(param.type, NotEmpty):
                    continue
                if isinstance(param, click.Argument):  # the ones before it get a value
                    before = ["x"] * arguments.index(param)
                    found.append(([*path, name, *before, ""], parameter_name(param)))
                else:
                    found.append(([*path, name, param.opts[0], ""], parameter_name(param)))

    walk(cli, [])
    return found


TEXT_PARAMETERS = text_parameters()


def test_every_command_has_its_text_parameters_checked() -> None:
    checked = {(args[0], name) for args, name in TEXT_PARAMETERS}
    assert {("train", "--run-id"), ("predict", "--model"), ("evaluate", "--dataset-version"),
            ("synth", "OUT_DIR"), ("datasets", "NAME"), ("retrain", "--source"),
            ("score", "INPUT"), ("distill", "--teacher")} <= checked
    assert len(TEXT_PARAMETERS) > 60


@pytest.mark.parametrize("case", TEXT_PARAMETERS, ids=map(case_id, TEXT_PARAMETERS))
def test_an_empty_value_is_refused_naming_it(case, tmp_path: Path) -> None:
    args, name = case
    result = CliRunner().invoke(cli, args, env={"FLOWERML_STORE": str(tmp_path / "store"),
                                                "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert_refused(result, f"flowerml: error: {name} must not be empty")
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def without_root_powers(command: list[str]) -> list[str]:
    """`command` as a user for whom file permissions count: as root (CI, containers), the same
    uid without the capabilities that bypass them (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return command
    powers = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={powers}", f"--bounding-set={powers}", *command]


def flowerml_process(args: list[str], registered_run: RegisteredRun,
                     tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLOWERML_STORE": str(registered_run.store.root),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(without_root_powers([sys.executable, "-m", "flowerml.cli", *args]),
                          env=env, capture_output=True, text=True, timeout=120)


def assert_denied(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"flowerml: error: {message}\n"
    assert json.loads(done.stdout.splitlines()[-1]) == {"error": message, "kind": "denied"}


@pytest.mark.slow  # a process without root's powers over permissions
def test_an_unreadable_registry_is_denied_not_empty(registered_run: RegisteredRun,
                                                    tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(registered_run.store.root, store)
    (store / "registry").chmod(0)
    try:
        done = flowerml_process(["registry", "list", "--store", str(store), "--json"],
                                registered_run, tmp_path)
    finally:
        (store / "registry").chmod(0o755)
    assert_denied(done, f"cannot read {store}/registry in the store {store}: "
                        "Permission denied")


@pytest.mark.slow  # a process without root's powers over permissions
def test_a_read_only_output_is_denied(registered_run: RegisteredRun, tmp_path: Path) -> None:
    image = next(registered_run.cache.rglob("*.jpg"))
    output = tmp_path / "read-only"
    output.mkdir(mode=0o555)
    done = flowerml_process(["score", str(image.parent), "--output", str(output), "--json"],
                            registered_run, tmp_path)
    assert_denied(done, f"--output {output} is not writable: store directory {output} is not "
                        "writable")
    assert list(output.iterdir()) == []
