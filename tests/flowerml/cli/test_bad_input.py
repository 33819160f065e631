"""Every subcommand's bad input, as a user types it: one `flowerml: error:` line naming the
thing, exit code 2, no traceback; and with --json, stdout holds only JSON and ends with
{"error", "kind"}. Runs the console script's group (flows.cli), so `retrain` is in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from flows.cli import cli
from tests.cli_helpers import assert_refused
from tests.flowerml.conftest import RegisteredRun

# (arguments, a fragment the one error line must hold). {src}: a synthetic source folder,
# {img}: an image, {tmp}: a fresh folder; the store is the registered run's (flowers102:1).
CASES: list[tuple[list[str], str]] = [
    (["synth", "/proc/flowerml-nope"], "/proc/flowerml-nope"),
    (["synth", "{tmp}/s", "--classes", "0"], "--classes"),
    (["synth", "{src}"], "already exists (--force overwrites it)"),
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
]


@pytest.fixture
def fill(registered_run: RegisteredRun, synthetic_source: Path, tmp_path: Path):
    image = next(registered_run.cache.rglob("*.jpg"))

    def fill(args: list[str]) -> list[str]:
        return [a.format(src=synthetic_source, img=image, tmp=tmp_path) for a in args]
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
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (30_000, 30_000)).save(bomb)  # 900 megapixels, a few hundred KB on disk
    result = run(["predict", str(bomb), "--json"], registered_run, tmp_path)
    assert result.exit_code == 1  # predict's rule: a failed input is a row, and exit 1
    assert "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1 and "too large" in result.stderr
    assert json.loads(result.stdout)["error"].startswith("too large to decode safely")
