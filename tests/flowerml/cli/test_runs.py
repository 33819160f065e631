"""`flowerml runs list|show|delete`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from flowerml.cli import cli
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from flowerml.training.runs import RunFiles
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.stores import copy_tree, store_keys
from tests.helpers.synthetic import DATASET, TINY_RUN, RegisteredRun


@pytest.fixture
def store(registered_run: RegisteredRun, tmp_path: Path) -> LocalStore:
    """A private copy of the store with the tiny run, evaluated and registered as
    flowers102:000001, and a second run that never started an epoch."""
    copy_tree(registered_run.store.root, tmp_path / "store")
    store = LocalStore(tmp_path / "store")
    record = RunFiles(store, TINY_RUN).read_json("config.json")
    RunFiles(store, "fresh").write_json("config.json", record)
    return store


def last_json(stdout: str) -> object:
    return json.loads(stdout.strip().splitlines()[-1])


def test_list(store: LocalStore, registered_run: RegisteredRun) -> None:
    result = invoke("runs", "list", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    tiny, fresh = lines[TINY_RUN], lines["fresh"]
    version = RunFiles(store, TINY_RUN).read_json("config.json")["dataset"]["version"]
    assert f"finished  {DATASET}@{version}  resnet18  1/1 epochs" in tiny
    assert f"test top-1 {registered_run.metrics['top1']:.4f}" in tiny
    assert tiny.endswith("registered flowers102:000001")
    assert "not started" in fresh and "0/1 epochs" in fresh and "test top-1 -" in fresh


def test_list_json(store: LocalStore) -> None:
    result = invoke("runs", "list", "--store", str(store.root), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert [row["run_id"] for row in rows] == ["fresh", TINY_RUN]
    assert rows[1]["location"] == f"{store.uri}/runs/{TINY_RUN}/"
    assert rows[1]["registered"] == ["flowers102:000001"]


def test_an_empty_store_lists_nothing(tmp_path: Path) -> None:
    empty = str(tmp_path / "empty")
    result = invoke("runs", "list", "--store", empty)
    assert result.exit_code == 0 and result.stdout == ""
    assert "no runs on" in result.stderr
    result = invoke("runs", "list", "--store", empty, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_show(store: LocalStore, registered_run: RegisteredRun) -> None:
    result = invoke("runs", "show", TINY_RUN, "--store", str(store.root))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {TINY_RUN}: finished, 1/1 epochs"
    assert f"  location: {store.uri}/runs/{TINY_RUN}/" in lines
    [config] = [line for line in lines if line.startswith("  config: ")]
    assert "arch=resnet18" in config and "weights=none" in config and "epochs=1" in config
    assert any(line.startswith("  epoch 1: train loss ") for line in lines)
    report = f"report {store.uri}/runs/{TINY_RUN}/eval/test/report.md"
    assert any(line.startswith(f"  test: top-1 {registered_run.metrics['top1']:.4f}")
               and line.endswith(report) for line in lines)
    assert lines[-1] == "  registered: flowers102:000001"
    assert lines[2] == (f"  tensorboard: tensorboard --logdir "
                        f"{store.uri}/runs/{TINY_RUN}/tensorboard")


def test_show_names_tensorboard_only_for_a_run_with_event_files(store: LocalStore) -> None:
    result = invoke("runs", "show", "fresh", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    assert not any(line.startswith("  tensorboard:") for line in result.stdout.splitlines())
    result = invoke("runs", "show", "fresh", "--store", str(store.root), "--json")
    assert json.loads(result.stdout)["tensorboard"] is None


def test_show_on_s3_names_the_s3_logdir(store: LocalStore, s3_store: S3Store,
                                        moto_endpoint: str) -> None:
    for key in store_keys(store, f"runs/{TINY_RUN}/"):
        s3_store.put_file(key, store.root / key)
    result = invoke("runs", "show", TINY_RUN, "--store", s3_store.uri,
                    env={"FLOWERML_S3_ENDPOINT_URL": moto_endpoint})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2:4] == [
        f"  tensorboard: tensorboard --logdir {s3_store.uri}/runs/{TINY_RUN}/tensorboard",
        "    (TensorBoard reads S3 with the standard AWS credentials; for an S3-compatible "
        "server set AWS_ENDPOINT_URL_S3 to its URL first)"]


def test_show_json(store: LocalStore) -> None:
    result = invoke("runs", "show", TINY_RUN, "--store", str(store.root), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["run_id"] == TINY_RUN and shown["status"] == "finished"
    assert shown["config"]["arch"] == "resnet18" and len(shown["history"]) == 1
    assert shown["evaluations"][0]["report"].startswith(store.uri)
    assert shown["tensorboard"] == f"{store.uri}/runs/{TINY_RUN}/tensorboard"


@pytest.mark.parametrize("command", [["show", "nope"], ["delete", "nope"]])
def test_an_unknown_run(store: LocalStore, command: list[str]) -> None:
    result = invoke("runs", *command, "--store", str(store.root))
    assert_refused(result, f"run 'nope' not found on {store.uri}")
    result = invoke("runs", *command, "--store", str(store.root), "--json")
    assert result.exit_code == 2
    assert last_json(result.stdout) == {"error": f"run 'nope' not found on {store.uri}",
                                        "kind": "not-found"}


def test_a_malformed_run_id(store: LocalStore) -> None:
    assert_refused(invoke("runs", "show", "../x", "--store", str(store.root)),
                   "run id must be letters")


def test_delete(store: LocalStore) -> None:
    result = invoke("runs", "delete", "fresh", "--store", str(store.root))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"deleted run fresh: 1 files under {store.uri}/runs/fresh/\n"
    assert not RunFiles(store, "fresh").exists()


def test_delete_of_a_registered_run_is_refused_unless_forced(store: LocalStore) -> None:
    before = [info.key for info in store.list(f"runs/{TINY_RUN}/")]
    result = invoke("runs", "delete", TINY_RUN, "--store", str(store.root), "--json")
    assert result.exit_code == 2
    assert last_json(result.stdout)["kind"] == "refused"
    assert_refused(invoke("runs", "delete", TINY_RUN, "--store", str(store.root)),
                   "run 'tiny' is the source of registry version flowers102:000001; --force "
                   "deletes it anyway")
    assert [info.key for info in store.list(f"runs/{TINY_RUN}/")] == before
    result = invoke("runs", "delete", TINY_RUN, "--force", "--store", str(store.root), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "run_id": TINY_RUN, "location": f"{store.uri}/runs/{TINY_RUN}/", "files": len(before),
        "registered": ["flowers102:000001"], "forced": True}
    assert list(store.list(f"runs/{TINY_RUN}/")) == []
    assert store.exists("registry/flowers102/versions/000001/COMMITTED")


@pytest.mark.parametrize("group", ["runs", "datasets"])
def test_every_option_has_help(group: str) -> None:
    commands = cli.commands[group].commands
    for name, command in commands.items():
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert {"--store", "--json"} <= {opt for p in options for opt in p.opts}, name
        assert [p.name for p in options if not p.help] == [], name


def test_a_garbage_line_in_metrics_jsonl_is_one_line_naming_it(
        store: LocalStore, registered_run: RegisteredRun, tmp_path: Path) -> None:
    """runs show and evaluate read the run's curves: a damaged line is named, file and line,
    and evaluate publishes nothing of its new evaluation."""
    key = f"runs/{TINY_RUN}/metrics.jsonl"
    store.put_bytes(key, store.get_bytes(key) + b"{not json\n")
    lines = len(store.get_bytes(key).splitlines())
    line = f"{store.root}/{key}: line {lines} is not JSON"
    metrics = store.get_bytes(f"runs/{TINY_RUN}/eval/test/metrics.json")
    cache = copy_tree(registered_run.cache, tmp_path / "cache")
    result = invoke("evaluate", "--run", TINY_RUN, "--device", "cpu", store=store, cache=cache)
    assert_refused(result, line)
    assert result.stderr == f"flowerml: error: {line}\n"
    assert store.get_bytes(f"runs/{TINY_RUN}/eval/test/metrics.json") == metrics
    shown = invoke("runs", "show", TINY_RUN, store=store, cache=cache)  # shows the problem
    assert f"  problem: {line}\n" in shown.stdout and "Traceback" not in shown.output
