"""`make deploy-demo`: the real deployment path on this machine, on the CPU, in one command.

It starts a Prefect server on 127.0.0.1 (its own PREFECT_HOME and SQLite database under
./flowerml-deploy-demo/), creates the `gpu` and `cpu` pools from deploy/pools with the GPU
pool's concurrency limit, registers deploy/prefect.yaml, applies the operations automations
(zombie detection, crash recovery), starts a process worker, runs the `retrain-manual`
deployment with demo parameters (a synthetic archive, the `demo` recipe, a 0.7 gate), waits for
it, prints the decision, waits for the retrain-on-new-data run its ingest's event started (Up to
date: nothing new), prints the UI URL, and stops everything it started. With `--keep` the
server stays up (open the UI) until Ctrl-C.

`LocalPrefect` is also what tests/deploy/test_deployment.py drives, so the demo and the test walk
the same path as deploy/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowerml.core import launch

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
# `flowerml worker`: the Prefect process worker that the systemd unit and the image run, which
# drains its flow runs on SIGTERM (flows/worker.py).
FLOWERML_WORKER = [sys.executable, "-c", "from flows.cli import main; main()", "worker"]
# The server runs as `python -m prefect` with faulthandler listening on SIGUSR1, so a server that
# hangs on start can say where.
SERVER = [sys.executable, "-c", "import faulthandler, runpy, signal; "
          "faulthandler.register(signal.SIGUSR1, all_threads=True); "
          "runpy.run_module('prefect', run_name='__main__', alter_sys=True)"]
DEMO_TRAINING = {"recipe": "demo", "device": "cpu"}


# uvicorn's words when the port Prefect checked was taken before it bound (the picked port is
# free when picked; another process's bind to port 0 can get it meanwhile).
BIND_ERROR = "error while attempting to bind"


# Everything here talks to 127.0.0.1, so it goes direct. urllib.request.urlopen's shared opener
# keeps the proxies the environment named when it was first used (by torch.hub, say) and would
# send loopback requests to a proxy long gone; a user's HTTP_PROXY does not cover 127.0.0.1 either.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
API_ATTEMPTS = 5  # a 503 or 429 is retried after 1, 2, 4, 8 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrefect:
    """A Prefect server and workers on loopback, each a process group of its own."""

    poll_s = 1.0  # how often a wait asks the API again

    def __init__(self, root: Path, *, ui: bool = True, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update({
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": f"{self.url}/api",
            "PREFECT_UI_URL": self.url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true" if ui else "false",
            # What the systemd unit and the image set on real workers: heartbeats every 30 s
            # (Prefect's minimum) feed the zombie-detection automation.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
            **(env or {}),
        })
        self.processes: list[subprocess.Popen] = []

    def start_server(self, timeout: float = 150, attempts: int = 2) -> None:
        """Start the server; one that is not healthy within `timeout` s has its threads' stacks
        written to server.log and is replaced by a fresh one (new port, new database)."""
        for attempt in range(1, attempts + 1):
            log = self.root / "server.log"
            log_start = log.stat().st_size if log.exists() else 0
            server = self._spawn("server", [*SERVER, "server", "start", "--host", "127.0.0.1",
                                            "--port", str(self.port)])
            self.processes.insert(0, server)
            try:
                self._wait_for_health(server, timeout, log_start)
                return
            except RuntimeError:
                self.processes.remove(server)
                stop_group(server)
                if attempt == attempts:
                    raise
                self._move_to_fresh_port_and_database(attempt)

    def start_worker(self, pool: str, *extra: str, name: str = "worker") -> subprocess.Popen:
        process = self._spawn(name, [*FLOWERML_WORKER, "--pool", pool, *extra])
        self.processes.append(process)
        return process

    def prefect(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([*PREFECT, *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done.stdout

    def api(self, path: str, body: dict | None = None, method: str | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api{path}", method=method or ("POST" if body is not None else "GET"),
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"})
        for attempt in range(API_ATTEMPTS):
            try:
                with LOOPBACK.open(request, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:
                # A busy server sheds load with 503 (its SQLite database locked) or 429, which
                # Prefect's own client retries too.
                if error.code not in (429, 503) or attempt == API_ATTEMPTS - 1:
                    raise
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def set_up_deployments(self, automation_file: Path | None = None) -> None:
        """deploy/README.md sections 2, 7 and 9, as an operator runs them."""
        self.prefect("work-pool", "create", "gpu", "--type", "process",
                     "--base-job-template", "deploy/pools/process.json")
        self.prefect("work-pool", "set-concurrency-limit", "gpu", "1")
        self.prefect("work-pool", "create", "cpu", "--type", "process")
        self.prefect("deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        self.apply_automations(automation_file or REPO / "deploy/automations/operations.yaml")

    def summary(self) -> str:
        """What the server holds, counted from its API (not what this script meant to make)."""
        pools = self.api("/work_pools/filter", {})
        deployments = self.api("/deployments/filter", {})
        automations = self.api("/automations/filter", {})
        pool_names = ", ".join(
            f"{pool['name']} (concurrency {pool['concurrency_limit']})"
            if pool["concurrency_limit"] is not None else pool["name"] for pool in pools)
        return (f"pools {pool_names}; {len(deployments)} deployments "
                f"({', '.join(sorted(d['name'] for d in deployments))}); "
                f"{len(automations)} automations")

    def apply_automations(self, path: Path) -> None:
        """`python deploy/automations/apply.py FILE`, as the runbook has it."""
        subprocess.run([sys.executable, "deploy/automations/apply.py", str(path)], env=self.env,
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=120)

    def run_deployment(self, name: str, params: dict[str, Any]) -> str:
        """A run of a deployment whose flow takes one `params` object (retrain, distill)."""
        return self.start_run(name, {"params": params})

    def start_run(self, name: str, parameters: dict[str, Any]) -> str:
        """`prefect deployment run NAME --params ...`; returns the flow run's id. Parameters
        left out take the deployment's defaults."""
        out = self.prefect("deployment", "run", name, "--params", json.dumps(parameters))
        return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.api(f"/flow_runs/{run_id}")

    def wait_for_final_state(self, run_id: str, timeout: float,
                             during: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state_type"] in ("COMPLETED", "FAILED", "CANCELLED") or (
                    run["state_type"] == "CRASHED" and run["state_name"] != "Crashed"):
                return run
            if during:
                during()
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run_id} still {run['state_name']} after "
                                   f"{timeout:g} s; logs in {self.root}")
            time.sleep(self.poll_s)

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        """The flow runs of `deployment` (FLOW/NAME), oldest first."""
        found = self.api(f"/deployments/name/{deployment}")
        return self.api("/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [found["id"]]}},
            "sort": "EXPECTED_START_TIME_ASC"})

    def wait_for_triggered_run(self, deployment: str, known: set[str],
                               timeout: float = 120) -> str:
        """The id of the first run of `deployment` not in `known` (an automation made it)."""
        deadline = time.monotonic() + timeout
        while True:
            new = [run["id"] for run in self.runs_of(deployment) if run["id"] not in known]
            if new:
                return new[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no run of {deployment} was triggered in {timeout:g} s")
            time.sleep(self.poll_s)

    def set_deployment_params(self, deployment: str, **params: Any) -> None:
        """Change some of a retrain-style deployment's default `params` (the ones a schedule or
        an event trigger runs it with), as an operator edits prefect.yaml."""
        found = self.api(f"/deployments/name/{deployment}")
        self.api(f"/deployments/{found['id']}", {"parameters": {
            "params": {**found["parameters"]["params"], **params}}}, method="PATCH")

    def enable_automation(self, name: str, enabled: bool) -> None:
        for automation in self.api("/automations/filter", {}):
            if automation["name"] == name:
                self.api(f"/automations/{automation['id']}", {"enabled": enabled},
                         method="PATCH")
                return
        raise LookupError(f"no automation named {name}")

    def latest_artifact(self, key: str) -> dict[str, Any] | None:
        with contextlib.suppress(urllib.error.HTTPError):
            return self.api(f"/artifacts/{key}/latest")
        return None

    def stop_worker(self, worker: subprocess.Popen, timeout: float = 60) -> None:
        """The systemd unit's stop (KillMode=mixed): SIGTERM to `flowerml worker`, which drains
        its flow runs; whatever is left of the unit after TimeoutStopSec gets SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=timeout)
        stop_group(worker, grace=0)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_group(process)
        self.processes.clear()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - the process keeps it
        return subprocess.Popen(command, env=self.env, cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_health(self, server: subprocess.Popen, timeout: float,
                         log_start: int = 0) -> None:
        started = time.monotonic()
        while True:
            try:
                LOOPBACK.open(f"{self.url}/api/health", timeout=10)
                return
            except urllib.error.HTTPError:
                return  # it answers: up (a busy server may say 503 while it warms up)
            except OSError:
                pass
            waited = time.monotonic() - started
            lost_port = BIND_ERROR in self._log_since(log_start)
            if server.poll() is not None or waited > timeout or lost_port:
                state = (f"exited with {server.returncode}" if server.poll() is not None
                         else "another process took its port" if lost_port
                         else f"alive but not answering after {waited:.0f} s")
                log = (self.root / "server.log").read_text()
                raise RuntimeError(f"the Prefect server on {self.url} did not come up "
                                   f"({state}); the end of {self.root}/server.log:\n"
                                   f"{log[-2500:]}{self._stacks(server)}")
            time.sleep(0.3)

    def _log_since(self, offset: int) -> str:
        with open(self.root / "server.log", "rb") as stream:
            stream.seek(offset)
            return stream.read().decode(errors="replace")

    def _stacks(self, server: subprocess.Popen) -> str:
        """The hung server's threads, innermost frames first (faulthandler on SIGUSR1)."""
        if server.poll() is not None:
            return ""
        before = (self.root / "server.log").stat().st_size
        server.send_signal(signal.SIGUSR1)
        time.sleep(2)
        return "\nWhere its threads were:\n" + self._log_since(before)[:6000]

    def _move_to_fresh_port_and_database(self, attempt: int) -> None:
        old_url = self.url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        database = self.root / f"prefect-{attempt + 1}.db"
        self.env.update({
            "PREFECT_API_URL": f"{self.url}/api",
            "PREFECT_UI_URL": self.url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
        })
        with open(self.root / "server.log", "a") as log:
            log.write(f"\n--- {old_url} did not come up; starting again on {self.url} ---\n")


def stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGINT a process group (Prefect's workers and server stop cleanly on it), then KILL."""
    launch.stop_group(process, grace, first=signal.SIGINT)


@contextlib.contextmanager
def local_prefect(root: Path, **options: Any) -> Iterator[LocalPrefect]:
    prefect = LocalPrefect(root, **options)
    try:
        prefect.start_server()
        yield prefect
    finally:
        prefect.stop()


def write_demo_source(folder: Path) -> None:
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    write_synthetic_archive(folder, SyntheticSpec(classes=10, per_class=30, image_size=96))


def demo_folder(description: str, default: str) -> argparse.Namespace:
    """A demo's command line (`--dir`, emptied, with the demo's source archive in it; `--keep`)
    and its signals: Ctrl-C, and SIGTERM from `timeout` or a CI runner, unwind through the
    cleanup that stops the server and the workers (a background job may have started with
    SIGINT ignored)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dir", type=Path, default=Path(default),
                        help="where the server's database, the store and the logs go "
                             "(emptied first)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the server up after the demo, until Ctrl-C")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.dir = args.dir.resolve()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    write_demo_source(args.dir / "source")
    return args


def store_env(root: Path) -> dict[str, str]:
    return {"FLOWERML_STORE": str(root / "store"), "FLOWERML_CACHE_DIR": str(root / "cache")}


def main() -> int:
    args = demo_folder(__doc__.splitlines()[0], "flowerml-deploy-demo")
    root, env = args.dir, store_env(args.dir)
    started = time.monotonic()
    with local_prefect(root, env=env) as prefect:
        print(f"Prefect server and UI: {prefect.url} (logs in {root})", flush=True)
        prefect.set_up_deployments()
        print(prefect.summary(), flush=True)
        # The new-data deployment runs with its defaults when the demo's ingest publishes:
        # give it the demo's data and recipe, as an operator sets theirs in prefect.yaml.
        demo_params = {"source": str(root / "source"), "training": DEMO_TRAINING,
                       "gate": {"threshold": 0.7}}
        prefect.set_deployment_params("retrain-flowers/retrain-on-new-data", **demo_params)
        prefect.start_worker("gpu", "--limit", "1", name="worker-gpu")
        run_id = prefect.run_deployment("retrain-flowers/retrain-manual", demo_params)
        print(f"flow run {run_id}: {prefect.url}/runs/flow-run/{run_id}", flush=True)
        run = prefect.wait_for_final_state(run_id, timeout=900)
        decision = prefect.latest_artifact("flowers102-promotion-decision")
        print(f"\nflow run {run['name']}: {run['state_name']} "
              f"after {time.monotonic() - started:.0f} s")
        print(decision["data"] if decision else "(no decision: see the worker log)")
        # Its ingest published the dataset: retrain-on-new-data was triggered, and finds
        # nothing new to train on.
        triggered = prefect.wait_for_final_state(prefect.wait_for_triggered_run(
            "retrain-flowers/retrain-on-new-data", set()), timeout=600)
        print(f"\nretrain-on-new-data (started by the ingest's flowerml.dataset.published "
              f"event): {triggered['state_name']}\n  {triggered['state']['message']}")
        print(f"UI: {prefect.url}/runs/flow-run/{run_id}")
        if args.keep:
            print("serving until Ctrl-C ...", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        else:
            print("(stopping the server: `.venv/bin/python deploy/demo.py --keep` keeps it up "
                  "to look at the run, its artifacts and the form in the UI)")
    return 0 if run["state_type"] == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
