"""`flowerml score --dask-address` on a real Dask cluster (distributed.LocalCluster on
127.0.0.1) and `flowerml pools` against the session's Prefect test server
(flows/cli_cluster.py)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner

from flows.cli import cli
from tests.helpers.cli import assert_refused
from tests.helpers.scoring import rows_in_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # Prefect's server, Dask processes


@pytest.fixture(scope="module")
def dask_workers() -> int:
    """One worker: enough to show the shards ran on the cluster and not in `flowerml score`
    (test_score.py's cluster has two, for the worker it kills)."""
    return 1


@pytest.fixture(scope="module")
def dask_forkserver() -> bool:
    """Spawned, as `dask worker` processes start: a forkserver would import as much for this
    one worker as the worker itself does."""
    return False


def harness_env() -> dict[str, str]:
    """This environment, reporting to the session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def test_score_with_dask_address_runs_the_shards_on_the_cluster(
        prefect_harness: None, registry_root: Path, photos: Path, cluster,  # noqa: F811
        tmp_path: Path) -> None:
    """As a shell runs it: the score-images flow scores every shard on the cluster's workers
    (their pids, not this process's, are in the flow's task runs) and prints the summary as
    `flowerml score` does; one unreadable photo makes it exit 1."""
    tasks_before = tasks_executed(cluster)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "score", str(photos), "--output",
         str(tmp_path / "scores"), "--store", str(registry_root), "--runtime", "torch",
         "--shard-size", "2", "--batch-size", "2", "--threads", "1", "--dask-address",
         cluster.scheduler_address, "--json"],
        env=harness_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds the summary and nothing else
    assert (summary["images"], summary["failed"], summary["shards"]) == (8, 1, 4)
    assert len(rows_in_folder(summary)) == 8 and (Path(summary["output"]) / "_SUCCESS.json").is_file()
    [line] = done.stderr.splitlines()  # the flow run, named once; no Prefect log line
    assert line.startswith(f"flowerml: flow run 'score {photos} with flowers102@production' (") \
        and line.endswith(f"): shards on the Dask scheduler {cluster.scheduler_address}"), line
    assert tasks_executed(cluster) >= tasks_before + 4  # the cluster's workers did the shards


def tasks_executed(local_cluster) -> int:
    """How many tasks the cluster's workers have run (since their nannies started them)."""
    from distributed import Client

    with Client(local_cluster.scheduler_address, timeout=60) as client:
        counts = client.run(lambda dask_worker: dask_worker.state.executed_count)
    return sum(counts.values())


def test_score_with_an_address_where_no_scheduler_answers_is_one_line(
        prefect_harness: None, registry_root: Path, photos: Path, tmp_path: Path,  # noqa: F811
        free_tcp_port: int) -> None:
    base = [str(photos), "--output", str(tmp_path / "scores"), "--store", str(registry_root)]
    address = f"tcp://127.0.0.1:{free_tcp_port}"
    for extra, message, kind in (
            (["--dask-address", address],
             f"--dask-address {address}: no Dask scheduler answered within 5 s", "unavailable"),
            (["--dask-address", "8786"],
             "--dask-address: String should match pattern", "bad-input")):
        refused = CliRunner().invoke(cli, ["score", *base, *extra, "--json"])
        assert_refused(refused, f"flowerml: error: {message}")
        assert json.loads(refused.stdout.splitlines()[-1])["kind"] == kind
        assert not (tmp_path / "scores").exists()  # nothing listed, nothing written


def test_pools_shows_slots_in_use_and_the_workers_polling(prefect_harness: None) -> None:
    """A pool with a concurrency limit of 2, one Running and one Pending run in it (both hold
    a slot), one Scheduled now (waiting), one next week (not yet) and one Completed run (none
    holds one), one worker's heartbeat; and a paused pool without a limit."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Completed, Pending, Running, Scheduled

    gpu, cpu = f"gpu-{uuid4().hex[:8]}", f"cpu-{uuid4().hex[:8]}"

    @flow(name="pools-test")
    def noop() -> None:
        pass

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=gpu, type="process", concurrency_limit=2))
        client.create_work_pool(WorkPoolCreate(name=cpu, type="process", is_paused=True))
        flow_id = client.create_flow(noop)
        deployment = client.create_deployment(flow_id, f"in-{gpu}", work_pool_name=gpu)
        next_week = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        for state in (Running(), Pending(), Scheduled(), Scheduled(scheduled_time=next_week),
                      Completed()):
            client.create_flow_run_from_deployment(deployment, state=state)
        client.send_worker_heartbeat(gpu, "host-a-gpu0", heartbeat_interval_seconds=30)

    listed = CliRunner().invoke(cli, ["pools", "--json"])
    assert listed.exit_code == 0, listed.output
    by_name = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {key: by_name[gpu][key] for key in ("type", "paused", "concurrency_limit",
                                               "slots_in_use", "waiting")} == \
        {"type": "process", "paused": False, "concurrency_limit": 2, "slots_in_use": 2,
         "waiting": 1}
    [worker] = by_name[gpu]["workers"]
    assert worker["name"] == "host-a-gpu0" and worker["status"] == "ONLINE"
    seen = datetime.datetime.fromisoformat(worker["last_heartbeat"])
    assert abs((datetime.datetime.now(datetime.UTC) - seen).total_seconds()) < 60
    assert (by_name[cpu]["paused"], by_name[cpu]["concurrency_limit"],
            by_name[cpu]["slots_in_use"], by_name[cpu]["workers"]) == (True, None, 0, [])

    text = CliRunner().invoke(cli, ["pools"])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    at = lines.index(f"{gpu} (process): 2/2 slots in use, 1 waiting")
    assert lines[at + 1].startswith("  worker host-a-gpu0: online, last heartbeat ")
    at = lines.index(f"{cpu} (process, PAUSED): 0 runs Pending/Running (no concurrency "
                     "limit), 0 waiting")
    assert lines[at + 1] == "  no worker polls it"


def test_pools_without_a_reachable_api_is_one_line_naming_it(free_tcp_port: int) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://operator:s3cret@127.0.0.1:{free_tcp_port}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        refused = CliRunner().invoke(cli, ["pools", "--json"])
    assert_refused(refused, f"flowerml: error: Prefect API http://127.0.0.1:{free_tcp_port}"
                            f"/api (PREFECT_API_URL) is unreachable: connection refused")
    assert "s3cret" not in refused.output
    assert json.loads(refused.stdout.splitlines()[-1])["kind"] == "unavailable"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        refused = CliRunner().invoke(cli, ["pools"])
    assert_refused(refused, "flowerml: error: PREFECT_API_URL is not set")
