"""`flowerml retrain` (flows/retrain_command.py): every option checked before any work, what a
run shows on stderr (its id first, a line per epoch, the error last), its exit codes, and
signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil
import pytest
from click.testing import CliRunner

import flows.retrain_command as retrain_command
from flowerml.core.launch import process_alive
from flows.cli import cli
from tests.helpers.cli import assert_refused
from tests.helpers.prefect_database import seed_prefect_home
from tests.helpers.stores import store_keys


def retrain_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FLOWERML_STORE": str(tmp_path / "store"),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # Prefect's ephemeral mode, as a new user runs it
    return env


def harness_env(tmp_path: Path) -> dict[str, str]:
    """`retrain_env` reporting to the session's Prefect test server: for the tests whose point
    is not Prefect's temporary server (`test_retrain_demo_preset_json` starts one), a server
    already up saves each of them its start (seconds of CPU)."""
    from prefect.settings import PREFECT_API_URL

    return {**retrain_env(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}


def retrain_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """`flowerml retrain ARGS` in its own interpreter, as a shell runs it."""
    return subprocess.run([sys.executable, "-m", "flows.cli", "retrain", *args],
                          env=env or retrain_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def assert_only_flowerml_lines(stderr: str) -> list[str]:
    """No Prefect log line, no traceback (the temporary server's "database is locked" one
    included): every stderr line is flowerml's own."""
    lines = stderr.splitlines()
    assert lines and all(line.startswith("flowerml: ") for line in lines), stderr[-3000:]
    assert "Traceback" not in stderr and "database is locked" not in stderr
    return lines


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 40 s on 2 quiet cores: Prefect's temporary server, a synthetic
# archive of 300 images, one epoch at 32 px (the smallest --image-size allowed),
# evaluation, ONNX export and parity
def test_retrain_demo_preset_json(tmp_path: Path, prefect_database: Path) -> None:
    """`flowerml retrain --preset demo` end to end, in Prefect's ephemeral mode: the flow run
    is named first, then one line per epoch; one epoch cannot pass the demo's 0.7 gate, so the
    run registers a version, is not promoted and exits 1, like `registry promote`."""
    seed_prefect_home(tmp_path / "prefect", prefect_database)  # the temporary server's database
    done = retrain_process(tmp_path, "--preset", "demo", "--epochs", "1", "--image-size", "32",
                           "--json")
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert set(summary) == {"up_to_date", "dataset_version", "run_id", "metrics", "promoted",
                            "version", "reasons", "export"}
    assert summary["up_to_date"] is False  # a first run: nothing in production to compare
    assert summary["version"] == 1 and summary["metrics"]["n"] == 140
    assert summary["export"]["parity_passed"] and summary["export"]["parity_images"] == 140
    assert not summary["promoted"]
    assert any("threshold 0.7000" in reason for reason in summary["reasons"])
    first, *rest = assert_only_flowerml_lines(done.stderr)
    flow_run_id = summary["run_id"].removeprefix("flowers102-")
    assert first.startswith("flowerml: flow run 'retrain flowers102: resnet18 (demo)") and \
        f"({flow_run_id}); training run {summary['run_id']}" in first, first
    assert rest == [line for line in rest if line.startswith("flowerml: epoch 1/1: train loss")]
    assert len(rest) == 1, done.stderr
    from flowerml.io.storage_local import LocalStore
    from flowerml.registry.versions import Registry

    registry = Registry(LocalStore(tmp_path / "store"), "flowers102")
    assert registry.get(1).committed
    assert registry.alias() is None


@pytest.mark.slow
def test_a_failed_flow_run_ends_with_its_error(tmp_path: Path, prefect_harness: None) -> None:
    """A run that fails inside the flow (a source that is not the dataset) prints its id, then
    the error as the last stderr line, nothing of Prefect's; --json ends stdout with it."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
        (source / name).write_bytes(b"not the dataset")
    done = retrain_process(tmp_path, "--source", str(source), "--recipe", "demo", "--json",
                           env=harness_env(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = assert_only_flowerml_lines(done.stderr)
    assert lines[0].startswith("flowerml: flow run 'retrain flowers102:")
    assert lines[1:] == ["flowerml: error: 102flowers.tgz: is not a gzip archive"], lines
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "error": "102flowers.tgz: is not a gzip archive", "kind": "bad-input"}
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "demoo"], "--recipe must be one of default, tutorial, linear-probe, demo"),
    (["--arch", "resnet9"], "--arch must be one of"),
    (["--preset", "demo", "--freeze-stages", "6"],
     "--freeze-stages must be between 0 and 5 for resnet18 (got 6)"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--threshold", "1.5"], "--threshold must be at most 1 (got 1.5)"),
    (["--threshold", "nan"], "--threshold must be a finite number: got 'nan'"),
    (["--timeout-s", "-1"], "--timeout-s must be more than 0 (got -1.0)"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--weights", "missing.pth"], "--weights missing.pth: no such file missing.pth"),
    (["--weights", "s3://bucket/"], "an S3 source needs s3://bucket/key to a file"),
    (["--source", "ftp://host/x"], "source 'ftp://host/x' uses an unsupported scheme"),
    (["--source", "no-such-folder"], "source folder no-such-folder does not exist"),
    (["--store", "s3://Bad_Bucket!/x"], "invalid --store: 's3://Bad_Bucket!/x' has an invalid"),
    (["--dataset", "Bad"], "invalid --dataset"),
    (["--model-name", "Bad/Name"], "model name must be"),
    (["--mlflow", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is "
                                         "unreachable (connection refused)"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  args: list[str], message: str) -> None:
    """Each is refused before the flow starts (no Prefect server, no ingest): nothing is
    written to the store, and not even the demo's source archive to the cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(retrain_command, "run_retrain", lambda params: pytest.fail("the flow ran"))
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", *args], env={
        "FLOWERML_STORE": str(tmp_path / "store"), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert_refused(result, message)
    assert time.monotonic() - started < 60  # seconds when the machine is busy, not a run
    assert not (tmp_path / "store").exists() and not (tmp_path / "c" / "demo-source").exists()


@pytest.mark.parametrize(("args", "export_onnx"), [([], True), (["--no-export"], False),
                                                  (["--export"], True)])
def test_no_export_turns_the_flows_export_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               args: list[str], export_onnx: bool) -> None:
    ran = []

    def run_retrain(params):
        ran.append(params)
        return {"promoted": True, "version": 1, "metrics": {}, "reasons": [], "export": None,
                "run_id": "r", "dataset_version": "v"}

    monkeypatch.setattr(retrain_command, "run_retrain", run_retrain)
    monkeypatch.setattr(retrain_command, "check_prefect_api", lambda: None)
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", *args, "--json"], env={
        "FLOWERML_STORE": str(tmp_path / "store"), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert [params.export_onnx for params in ran] == [export_onnx]


@pytest.mark.parametrize(("args", "every"), [([], 5), (["--checkpoint-every", "1"], 1),
                                             (["--checkpoint-every", "3"], 3)])
def test_the_demo_checkpoints_every_fifth_epoch_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], every: int) -> None:
    ran = []
    monkeypatch.setattr(retrain_command, "run_retrain", lambda params: ran.append(params) or {
        "promoted": True, "version": 1, "metrics": {}, "reasons": [], "export": None,
        "run_id": "r", "dataset_version": "v"})
    monkeypatch.setattr(retrain_command, "check_prefect_api", lambda: None)
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", *args, "--json"], env={
        "FLOWERML_STORE": str(tmp_path / "store"), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert [params.training.checkpoint_every for params in ran] == [every]


@pytest.mark.parametrize(("args", "force_train"), [([], False), (["--force-train"], True)])
def test_an_up_to_date_run_says_why_and_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                args: list[str], force_train: bool) -> None:
    ran = []
    reason = ("up to date: flowers102:000001 was trained on this dataset version with this "
              "training config and flowerml version; nothing to train")

    def run_retrain(params):
        ran.append(params)
        return {"up_to_date": True, "promoted": False, "dataset_version": "v",
                "production": "flowers102:000001", "reasons": [reason]}

    monkeypatch.setattr(retrain_command, "run_retrain", run_retrain)
    monkeypatch.setattr(retrain_command, "check_prefect_api", lambda: None)
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", *args], env={
        "FLOWERML_STORE": str(tmp_path / "store"), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert result.stdout == f"UP TO DATE: flowers102:000001 (dataset v)\n  - {reason}\n"
    assert [params.force_train for params in ran] == [force_train]


@pytest.mark.slow
def test_an_unreachable_prefect_api_is_one_line_before_any_work(tmp_path: Path) -> None:
    env = {**retrain_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = retrain_process(tmp_path, "--preset", "demo", "--json", env=env, timeout=120)
    message = ("Prefect API http://127.0.0.1:9/api (PREFECT_API_URL) is unreachable: "
               "connection refused")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"error": done.stderr.strip().removeprefix(
        "flowerml: error: "), "kind": "unavailable"}
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_every_retrain_option_has_help() -> None:
    options = [param for param in cli.commands["retrain"].params
               if isinstance(param, click.Option)]
    assert [param.opts[0] for param in options if not param.help] == []
    assert "--verbose" in [param.opts[0] for param in options]


def training_children(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the training child and its workers)."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        if marker in command and "flowerml.cli train" in command:
            pids.append(process.pid)
    return pids


@pytest.mark.slow
def test_sigterm_stops_retrain_and_its_training_child(tmp_path: Path,
                                                      prefect_harness: None) -> None:
    """systemd, `timeout` and Kubernetes stop with SIGTERM: the flow and its training child's
    group stop within seconds, with one line saying so, and nothing is left running."""
    env = harness_env(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "retrain", "--preset",
                                "demo", "--epochs", "200", "--image-size", "40",
                                "--model-name", f"sigterm-{os.getpid()}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = f"sigterm-{os.getpid()}-"
    deadline = time.monotonic() + 240
    while not training_children(marker):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    time.sleep(1)  # the stop this test is about comes while training runs, not as it starts
    children = training_children(marker)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    stopped_after = time.monotonic() - started
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stopped_after < 30, stopped_after  # the training child's grace is 10 s
    lines = assert_only_flowerml_lines(stderr)
    errors = [line for line in lines if line.startswith("flowerml: error:")]
    assert errors == lines[-1:] and "stopped by SIGTERM" in errors[0], stderr[-3000:]
    assert not [pid for pid in children if process_alive(pid)]


# --------------------------------------------------------------------------------------------
# Weights and store write access: checked before Prefect starts


def flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


def bad_weights(folder: Path, kind: str) -> Path:
    """A file no training can start from, by what is wrong with it."""
    import pickle

    import torch

    path = folder / f"{kind}.pth"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    elif kind == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif kind == "wrong-shape":  # e.g. another arch's stem: a 3x3 first convolution
        torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    else:
        path.mkdir()
    return path


WEIGHTS_REFUSALS = {
    "fifo": "is not a regular file (a named pipe)",
    "pickle": "cannot be loaded as weights: not a torch weights file",
    "garbage": "cannot be loaded as weights",
    "wrong-shape": "does not fit resnet18: key 'conv1.weight' has shape [64, 3, 3, 3], resnet18 "
                   "needs [64, 3, 7, 7]",
    "folder": "is not a regular file (a folder)",
}


@pytest.fixture
def published_store(local_store, synthetic_data):
    """A local store with the small synthetic dataset published (CURRENT set)."""
    from tests.helpers.synthetic import SMALL_SPEC, publish_copy

    publish_copy(synthetic_data.published(SMALL_SPEC) / "store", local_store)
    return local_store


@pytest.mark.parametrize("kind", sorted(WEIGHTS_REFUSALS))
def test_bad_weights_are_refused_before_prefect_starts(
        kind: str, published_store, tmp_path: Path, prefect_harness: None) -> None:
    """README: nothing starts and nothing is written. The file is loaded (weights-only) and
    fitted to the arch before any flow run exists; CURRENT stays as it was."""
    local_store = published_store
    weights = bad_weights(tmp_path, kind)
    current = local_store.get_bytes("datasets/flowers102/CURRENT")
    runs_before = flow_run_count()
    result = CliRunner().invoke(cli, [
        "retrain", "--recipe", "demo", "--weights", str(weights), "--source", str(tmp_path),
        "--json"], env={"FLOWERML_STORE": str(local_store.root),
                        "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert_refused(result, f"--weights {weights}")
    assert WEIGHTS_REFUSALS[kind] in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "bad-input"
    assert flow_run_count() == runs_before
    assert local_store.get_bytes("datasets/flowers102/CURRENT") == current
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("weights", ["ftp://mirror/w.pth", "https://host/w.pth"])
def test_weights_by_an_unsupported_scheme_say_so(weights: str, tmp_path: Path) -> None:
    scheme = weights.split(":")[0]
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", "--weights", weights],
                                env={"FLOWERML_STORE": str(tmp_path / "store"),
                                     "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert_refused(result, f"--weights {weights}: the scheme '{scheme}' is not supported: give "
                           "none, imagenet, a file path, file://PATH or s3://bucket/key")


def test_a_read_only_store_key_is_refused_before_prefect_starts(
        seaweedfs_endpoint: str, seaweedfs_store, synthetic_data, tmp_path: Path,
        prefect_harness: None) -> None:
    """SeaweedFS's read-only identity passes `head_bucket` and every read: the write probe
    refuses it, before any flow run, ingest or upload."""
    from tests.helpers.synthetic import SMALL_SPEC, publish_copy

    publish_copy(synthetic_data.published(SMALL_SPEC) / "store", seaweedfs_store)
    current = seaweedfs_store.get_bytes("datasets/flowers102/CURRENT")
    keys_before = store_keys(seaweedfs_store)
    runs_before = flow_run_count()
    store = f"s3://{seaweedfs_store.bucket}/{seaweedfs_store.prefix}"
    result = CliRunner().invoke(cli, ["retrain", "--preset", "demo", "--store", store, "--json"],
                                env={"AWS_ACCESS_KEY_ID": "reader",
                                     "AWS_SECRET_ACCESS_KEY": "reader-secret",
                                     "FLOWERML_S3_ENDPOINT_URL": seaweedfs_endpoint,
                                     "FLOWERML_S3_ADDRESSING_STYLE": "path",
                                     "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert_refused(result, f"cannot write to the store {store}: access denied to bucket "
                           f"'{seaweedfs_store.bucket}'")
    assert "reader-secret" not in result.output
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "denied"
    assert flow_run_count() == runs_before
    assert store_keys(seaweedfs_store) == keys_before
    assert seaweedfs_store.get_bytes("datasets/flowers102/CURRENT") == current
    assert not (tmp_path / "c" / "demo-source").exists()
