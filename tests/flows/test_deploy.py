"""The real deployment path on CPU: a Prefect server, a process work pool, `prefect deploy` of
deploy/prefect.yaml's manual deployment, a worker with --run-once, and a promoted version on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flowerml.registry import Registry
from flowerml.storage import S3Options, S3Store
from tests.conftest import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def prefect_server(tmp_path: Path, moto_endpoint: str):
    """A real `prefect server start` (SQLite) on a free loopback port, and the env to reach it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "FLOWERML_WORKDIR": str(REPO),
        "FLOWERML_S3_ENDPOINT_URL": moto_endpoint,
        "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
    })
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/api/health", server, log=tmp_path / "server.log")
    yield env
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()


def prefect(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}" \
                                 f"\n{done.stderr[-3000:]}"
    return done.stdout


def test_manual_deployment_runs_on_a_process_worker(prefect_server: dict, tmp_path: Path,
                                                    s3_bucket: str, moto_endpoint: str,
                                                    synthetic_source: Path) -> None:
    env = prefect_server
    prefect(env, "work-pool", "create", "gpu", "--type", "process",
            "--base-job-template", "deploy/pools/process.json")
    prefect(env, "deploy", "--prefect-file", "deploy/prefect.yaml",
            "--name", "retrain-flowers/retrain-manual")
    params = {"params": {
        "source": str(synthetic_source), "store": f"s3://{s3_bucket}/ml",
        "training": {"recipe": "demo", "epochs": 2, "image_size": 40, "batch_size": 8,
                     "device": "cpu", "workers": 0},
        "gate": {"threshold": 0.0, "tolerance": 1.0, "force": False}}}
    prefect(env, "deployment", "run", "retrain-flowers/retrain-manual",
            "--params", json.dumps(params))
    prefect(env, "worker", "start", "--pool", "gpu", "--run-once", timeout=600)

    runs = json.loads(urllib.request.urlopen(urllib.request.Request(
        env["PREFECT_API_URL"] + "/flow_runs/filter", data=b"{}",
        headers={"Content-Type": "application/json"}), timeout=10).read())
    retrain_runs = [r for r in runs if r["name"].startswith("retrain flowers102")]
    assert [r["state_type"] for r in retrain_runs] == ["COMPLETED"], runs
    registry = Registry(S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint)),
                        "flowers102")
    assert registry.alias().version == 1
    assert registry.history()[0]["to"] == 1
    event = wait_for_event(env["PREFECT_API_URL"], "flowerml.model.promoted")
    assert event["resource"]["prefect.resource.id"] == "flowerml.model.flowers102"
    assert event["payload"]["version"] == 1 and "top1" in event["payload"]["metrics"]


def wait_for_event(api: str, name: str, timeout: float = 30) -> dict:
    """The first event of that name the server has stored (it persists them asynchronously)."""
    body = json.dumps({"filter": {"event": {"name": [name]}}}).encode()
    deadline = time.monotonic() + timeout
    while True:
        page = json.loads(urllib.request.urlopen(urllib.request.Request(
            api + "/events/filter", data=body, headers={"Content-Type": "application/json"}),
            timeout=10).read())
        if page["events"] or time.monotonic() > deadline:
            assert page["events"], f"no {name} event stored within {timeout} s"
            return page["events"][0]
        time.sleep(1)
