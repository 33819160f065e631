"""`flowerml retrain` (flows/cli.py): the demo preset end to end, bad parameters, and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowerml.launch import process_alive
from flows.cli import cli

pytestmark = pytest.mark.slow


def retrain_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FLOWERML_STORE": str(tmp_path / "store"),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # Prefect's ephemeral mode, as a new user runs it
    return env


def test_retrain_demo_preset_json(tmp_path: Path) -> None:
    """`flowerml retrain --preset demo` end to end, in Prefect's ephemeral mode."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "retrain", "--preset", "demo",
                           "--epochs", "1", "--image-size", "40", "--json"],
                          env=retrain_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert set(summary) == {"dataset_version", "run_id", "metrics", "promoted", "version",
                            "reasons"}
    assert summary["version"] == 1 and summary["metrics"]["n"] == 140
    assert any("threshold 0.7000" in reason for reason in summary["reasons"])
    from flowerml.registry import Registry
    from flowerml.storage import LocalStore

    registry = Registry(LocalStore(tmp_path / "store"), "flowers102")
    assert registry.get(1).committed
    assert (registry.alias() is not None) == summary["promoted"]


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "demoo"], "--recipe must be one of default, tutorial, linear-probe, demo"),
    (["--arch", "resnet9"], "--arch must be one of"),
    (["--preset", "demo", "--freeze-stages", "6"],
     "retrain parameter training: --freeze-stages must be between 0 and 5 for resnet18"),
    (["--threshold", "1.5"], "retrain parameter gate.threshold"),
])
def test_bad_parameters_are_one_line_before_any_work(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    result = CliRunner().invoke(cli, ["retrain", *args], env={
        "FLOWERML_STORE": str(tmp_path / "store"), "FLOWERML_CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "store").exists()


def training_children(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the training child and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in command and "flowerml.cli train" in command:
                pids.append(int(entry.name))
    return pids


def test_sigterm_stops_retrain_and_its_training_child(tmp_path: Path) -> None:
    """systemd, `timeout` and Kubernetes stop with SIGTERM: the flow and its training child's
    group stop within seconds, with one line saying so, and nothing is left running."""
    env = retrain_env(tmp_path)
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
    children = training_children(marker)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    stopped_after = time.monotonic() - started
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stopped_after < 30, stopped_after  # the training child's grace is 10 s
    errors = [line for line in stderr.splitlines() if line.startswith("flowerml: error:")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not [pid for pid in children if process_alive(pid)]
