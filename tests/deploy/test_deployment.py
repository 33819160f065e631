"""The real deployment path on CPU, as deploy/README.md runs it: a Prefect server, the pools
from deploy/pools (the gpu pool's concurrency limit 1), `prefect deploy --all`, the operations
automations, process workers, and the runs they execute, on a moto S3 store.

It kills what production loses: the worker and the flow-run process are SIGKILLed in the middle
of training. Without a human, the zombie automation marks the run Crashed (its heartbeats stop),
the recovery automation reschedules it, a restarted worker picks it up and the same flow run
resumes its training run from the last checkpoint. A manual run submitted meanwhile never trains
at the same time (one GPU, one limit), and the scheduler's runs each get their own training run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowerml.core.launch import process_alive
from flowerml.io.storage import S3Options
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.versions import Registry
from flowerml.training.runs import RunFiles
from flows.retrain import training_run_id

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from demo import REPO, LocalPrefect  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# Heartbeats come every 30 s (Prefect's minimum); the test's zombie threshold is just above it.
ZOMBIE_AFTER_S = 40


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str):
    """One server for the module, set up as the runbook says (pools, deployments, automations
    with the test's short zombie threshold)."""
    tmp_path = tmp_path_factory.mktemp("prefect-stack")
    prefect = LocalPrefect(tmp_path, ui=True, env={
        "FLOWERML_S3_ENDPOINT_URL": moto_endpoint,
        "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT2S",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "2",
    })
    try:
        prefect.start_server()
        prefect.set_up_deployments(short_zombie_automations(tmp_path))
        yield prefect
    finally:
        prefect.stop()


def short_zombie_automations(tmp_path: Path) -> Path:
    text = (REPO / "deploy/automations/operations.yaml").read_text()
    assert text.count("within: 90") == 1
    path = tmp_path / "operations.yaml"
    path.write_text(text.replace("within: 90", f"within: {ZOMBIE_AFTER_S}"))
    return path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the flow-run process and anything it started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def run_params(source: Path, bucket: str, epochs: int) -> dict:
    return {"source": str(source), "store": f"s3://{bucket}/ml",
            "training": {"recipe": "demo", "epochs": epochs, "image_size": 40, "batch_size": 8,
                         "device": "cpu", "workers": 0},
            "gate": {"threshold": 0.0, "tolerance": 1.0}}


def test_scheduled_runs_each_get_their_own_training_run(prefect_stack: LocalPrefect,
                                                        tmp_path: Path) -> None:
    prefect = prefect_stack
    weekly = prefect.api("/deployments/name/retrain-flowers/retrain-weekly")
    deadline = time.monotonic() + 120
    while len(runs := prefect.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {
            "any_": [weekly["id"]]}}})) < 2:
        assert time.monotonic() < deadline, "the scheduler made no weekly runs"
        time.sleep(1)
    assert all(r["state_type"] == "SCHEDULED" for r in runs)
    ids = [r["id"] for r in runs]
    assert len({training_run_id("flowers102", i) for i in ids}) == len(ids)
    # What the deployments and the pool look like to an operator.
    pool = prefect.api("/work_pools/gpu")
    assert pool["concurrency_limit"] == 1
    for name in ("retrain-weekly", "retrain-manual"):
        deployment = prefect.api(f"/deployments/name/retrain-flowers/{name}")
        assert deployment["entrypoint"] == "flows.retrain.retrain_flowers"
        assert deployment["global_concurrency_limit"] is None  # the pool's limit is the one
        assert deployment["parameters"]["params"]["training"]["timeout_s"] == 7200
    names = {a["name"] for a in prefect.api("/automations/filter", {})}
    assert {"flowerml-crash-zombie-flow-runs", "flowerml-recover-crashed-retrain"} <= names
    # Applying the automations again replaces them instead of doubling them.
    prefect.apply_automations(short_zombie_automations(tmp_path))
    assert sorted(a["name"] for a in prefect.api("/automations/filter", {})) == sorted(names)


def test_the_notifications_apply_with_a_block(prefect_stack: LocalPrefect) -> None:
    """deploy/README.md section 9: save a notification block, apply notify-promotion.yaml."""
    import subprocess

    prefect = prefect_stack
    subprocess.run([sys.executable, "-c", "from prefect.blocks.notifications import "
                    "SlackWebhook; SlackWebhook(url='https://hooks.slack.com/services/x')"
                    ".save('flowerml-alerts', overwrite=True)"],
                   env=prefect.env, check=True, capture_output=True, timeout=120)
    refused = subprocess.run([sys.executable, "deploy/automations/apply.py",
                              "deploy/automations/notify-promotion.yaml"], env=prefect.env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "give --block TYPE/NAME" in refused.stderr
    done = subprocess.run([sys.executable, "deploy/automations/apply.py",
                           "deploy/automations/notify-promotion.yaml", "--block",
                           "slack-webhook/flowerml-alerts"], env=prefect.env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    automations = {a["name"]: a for a in prefect.api("/automations/filter", {})}
    alert = automations["flowerml-weekly-retrain-needs-attention"]
    assert set(alert["trigger"]["expect"]) == {"prefect.flow-run.Failed",
                                               "prefect.flow-run.Crashed",
                                               "prefect.flow-run.Late"}
    block = alert["actions"][0]["block_document_id"]
    assert block != "00000000-0000-0000-0000-000000000000"
    assert {automations[n]["actions"][0]["block_document_id"] for n in (
        "flowerml-model-promoted", "flowerml-model-rejected")} == {block}


def stop_as_the_unit_does(worker, timeout: float = 60) -> list[int]:
    """deploy/systemd's stop (KillMode=mixed): SIGTERM to the main process, `flowerml worker`;
    once it has exited (or after TimeoutStopSec), SIGKILL to whatever is left of the unit.
    Returns the processes that were still left for that SIGKILL."""
    unit = [worker.pid, *descendants(worker.pid)]
    os.kill(worker.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=timeout)
    left = [pid for pid in unit if process_alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def test_the_systemd_stop_sequence_stops_an_idle_worker_at_once(
        prefect_stack: LocalPrefect) -> None:
    """deploy/systemd: one SIGTERM to `flowerml worker` ends an idle worker within seconds
    (a bare Prefect worker sat on its first SIGTERM for minutes), and so do two in a row."""
    prefect = prefect_stack
    prefect.prefect("work-pool", "create", "idle", "--type", "process")
    worker = prefect.start_worker("idle", "--limit", "1", name="idle-worker")
    deadline = time.monotonic() + 120
    while "started!" not in (prefect.root / "idle-worker.log").read_text():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.2)
    started = time.monotonic()
    assert stop_as_the_unit_does(worker, timeout=30) == []
    assert worker.returncode == 0 and time.monotonic() - started < 10
    # The runbook's old habit, two SIGTERMs in a row, ends an idle worker as fast.
    again = prefect.start_worker("idle", "--limit", "1", name="idle-worker-2")
    while "started!" not in (prefect.root / "idle-worker-2.log").read_text():
        assert time.monotonic() < deadline + 120 and again.poll() is None
        time.sleep(0.2)
    started = time.monotonic()
    os.kill(again.pid, signal.SIGTERM)
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait(timeout=30) == 0 and time.monotonic() - started < 10


def training_pids(root_pid: int) -> list[int]:
    return [p for p in descendants(root_pid) if "flowerml.cli train" in command_line(p)]


def wait_for_checkpoint_past(store: S3Store, run_id: str, epoch: int, prefect: LocalPrefect,
                             timeout: float = 300) -> int:
    """The epoch of the run's checkpoint once it is past `epoch`."""
    pointer = RunFiles(store, run_id).key("checkpoint.json")
    deadline = time.monotonic() + timeout
    while True:
        if store.exists(pointer) and (
                saved := json.loads(store.get_bytes(pointer))["epoch"]) > epoch:
            return saved
        assert time.monotonic() < deadline, f"no checkpoint past epoch {epoch}; logs in " \
                                            f"{prefect.root}"
        time.sleep(0.2)


def stop_busy_worker(prefect: LocalPrefect, worker, run: str, waiting: str | None,
                     stop: str) -> dict[str, float]:
    """Stop a worker that is training `run`; check it lets go within the runbook's bounds and
    takes nothing new (`waiting` is queued behind it). Returns the timings."""
    trainers = training_pids(worker.pid)
    assert trainers, "the training child is not running"
    signalled = time.monotonic()
    if stop == "unit":
        assert stop_as_the_unit_does(worker) == [], "the unit had processes left to SIGKILL"
    else:  # one SIGTERM: `docker stop`, Kubernetes, `kill -TERM`
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    timings = {"worker exited": time.monotonic() - signalled}
    while any(process_alive(p) for p in trainers):
        assert time.monotonic() - signalled < 20, "the training child outlived its worker"
        time.sleep(0.1)
    timings["training child stopped"] = time.monotonic() - signalled
    while prefect.flow_run(run)["state_type"] in ("RUNNING", "PENDING"):
        assert time.monotonic() - signalled < 15, "the run stayed Running after the stop"
        time.sleep(0.2)
    timings["run left Running"] = time.monotonic() - signalled
    assert worker.returncode == 0
    time.sleep(3)  # a worker that still polled (every 2 s here) would take a run now
    assert prefect.flow_run(run)["state_name"] == "Recovering"
    if waiting:
        assert prefect.flow_run(waiting)["state_type"] == "SCHEDULED"
    return timings


EPOCHS = 40  # about 0.3 s each here: long enough to be stopped twice while training


def test_a_stopped_busy_worker_lets_go_and_the_run_resumes_on_the_next(
        prefect_stack: LocalPrefect, s3_bucket: str, moto_endpoint: str,
        synthetic_source: Path) -> None:
    """A worker training a run is stopped twice, as systemd stops the unit and with a single
    SIGTERM: each time it takes no new run, its training child stops, the run is
    Crashed at once (not 90 s later by the zombie rule) and rescheduled, and the next worker
    resumes it from its checkpoint; it ends Completed with nothing of the stopped attempts
    left Running and one progress bar at 100%."""
    prefect = prefect_stack
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))
    run = prefect.run_deployment("retrain-flowers/retrain-manual",
                                 run_params(synthetic_source, s3_bucket, epochs=EPOCHS))
    # Queued behind it (the pool's one slot): a stopping worker must not take it.
    waiting = prefect.run_deployment("retrain-flowers/retrain-manual",
                                     run_params(synthetic_source, s3_bucket, epochs=1))
    run_id = training_run_id("flowers102", run)
    epoch, timings = 0, {}
    for attempt, stop in enumerate(("unit", "one SIGTERM"), start=1):
        worker = prefect.start_worker("gpu", "--limit", "1", name=f"busy-{attempt}")
        epoch = wait_for_checkpoint_past(store, run_id, epoch, prefect)
        timings[stop] = stop_busy_worker(prefect, worker, run, waiting, stop)
        if waiting:  # it has shown that the stopped worker took nothing; the next would
            prefect.api(f"/flow_runs/{waiting}", method="DELETE")
            waiting = None
    last = prefect.start_worker("gpu", "--limit", "1", name="busy-3")
    final = prefect.wait_for_final_state(run, timeout=600)
    assert final["state_type"] == "COMPLETED", f"{final['state_name']}; logs in {prefect.root}"
    prefect.stop_worker(last)
    history = [s["name"] for s in prefect.api(f"/flow_run_states/?flow_run_id={run}")]
    assert history.count("Crashed") == 2 and history.count("Recovering") == 2, history
    result = json.loads(store.get_bytes(RunFiles(store, run_id).key("result.json")))
    assert result["resumed_from_epoch"] >= 2 and result["epochs_run"] == EPOCHS
    assert_nothing_left_running(prefect, run)
    print(f"\nbusy worker stops: {json.dumps(timings)}")


def assert_nothing_left_running(prefect: LocalPrefect, run: str) -> None:
    """The run graph of a recovered run: no task run left Running, one bar at 100%."""
    tasks = prefect.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run]}}})
    assert [t["name"] for t in tasks if t["state_type"] not in ("COMPLETED", "CRASHED")] == []
    bars = [a for a in prefect.api("/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run]}, "type": {"any_": ["progress"]}}})]
    assert [a["data"] for a in bars] == [100.0]


def test_a_killed_worker_run_resumes_without_a_human(prefect_stack: LocalPrefect, tmp_path: Path,
                                                     s3_bucket: str, moto_endpoint: str,
                                                     synthetic_source: Path) -> None:
    prefect = prefect_stack
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))
    # --limit 2: the worker could take both runs; only the pool's limit keeps them apart.
    worker = prefect.start_worker("gpu", "--limit", "2", name="worker-1")
    killed = prefect.run_deployment("retrain-flowers/retrain-weekly",
                                    run_params(synthetic_source, s3_bucket, epochs=8))
    waiting = prefect.run_deployment("retrain-flowers/retrain-manual",
                                     run_params(synthetic_source, s3_bucket, epochs=1))
    run_id = training_run_id("flowers102", killed)
    checkpoint = RunFiles(store, run_id).key("checkpoint.json")

    def one_training_at_a_time() -> None:
        states = [prefect.flow_run(i)["state_type"] for i in (killed, waiting)]
        assert sum(s in ("PENDING", "RUNNING") for s in states) <= 1, states

    def training_pids() -> list[int]:
        return [p for p in descendants(worker.pid) if "flowerml.cli train" in command_line(p)]

    deadline = time.monotonic() + 300
    while not store.exists(checkpoint):  # the first epoch is on the store: kill now
        assert time.monotonic() < deadline, f"no checkpoint; logs in {prefect.root}"
        one_training_at_a_time()
        time.sleep(0.2)
    trainers = training_pids()
    assert trainers, "the training child is not running"
    killed_at = time.monotonic()
    for pid in [worker.pid, *descendants(worker.pid)]:
        if pid not in trainers:  # the training child must go by itself
            os.kill(pid, signal.SIGKILL)
    while any(process_alive(p) for p in trainers):
        assert time.monotonic() - killed_at < 20, "the training child outlived its launcher"
        time.sleep(0.2)
    assert prefect.flow_run(killed)["state_name"] == "Running"  # a zombie, holding the slot

    restarted = prefect.start_worker("gpu", "--limit", "2", name="worker-2")
    final = prefect.wait_for_final_state(killed, timeout=600, during=one_training_at_a_time)
    recovered_after = time.monotonic() - killed_at
    assert final["state_type"] == "COMPLETED", f"{final['state_name']}; logs in {prefect.root}"
    assert prefect.wait_for_final_state(waiting, timeout=300)["state_type"] == "COMPLETED"
    history = [s["name"] for s in prefect.api(f"/flow_run_states/?flow_run_id={killed}")]
    assert "Crashed" in history and "Recovering" in history, history
    assert final["run_count"] == 2
    assert_nothing_left_running(prefect, killed)
    result = json.loads(store.get_bytes(RunFiles(store, run_id).key("result.json")))
    assert result["resumed_from_epoch"] >= 1 and result["epochs_run"] == 8
    registry = Registry(store, "flowers102")
    assert {v.card["lineage"]["run_id"] for v in registry.versions()} == {
        run_id, training_run_id("flowers102", waiting)}
    prefect.stop_worker(restarted)
    event = wait_for_event(prefect, "flowerml.model.promoted")
    assert event["resource"]["prefect.resource.id"] == "flowerml.model.flowers102"
    assert event["payload"]["version"] in (1, 2) and "top1" in event["payload"]["metrics"]
    print(f"\ncrash recovery: killed -> Completed in {recovered_after:.0f} s")


def wait_for_event(prefect: LocalPrefect, name: str, timeout: float = 30) -> dict:
    """The first event of that name the server has stored (it persists them asynchronously)."""
    deadline = time.monotonic() + timeout
    while not (page := prefect.api("/events/filter", {"filter": {"event": {"name": [name]}}}))[
            "events"]:
        assert time.monotonic() < deadline, f"no {name} event stored within {timeout} s"
        time.sleep(1)
    return page["events"][0]


CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_ui_shows_a_form_of_dropdowns_and_the_report_with_its_plots(
        prefect_stack: LocalPrefect, s3_bucket: str, synthetic_source: Path) -> None:
    """What a person sees, in headless Chromium: the custom-run form, titled "Retrain settings",
    offers dropdowns that start empty (the recipe decides), submitting it untouched overrides
    nothing, and the evaluation report artifact shows its plots (loaded images, not broken
    links)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (apt-get install chromium)"
    prefect = prefect_stack
    report = prefect.api("/artifacts/filter", {"artifacts": {
        "key": {"any_": ["flowers102-evaluation-report"]}}})
    if not report:  # the killed-worker test, earlier in this module, made some; else make one
        worker = prefect.start_worker("gpu", "--limit", "1", name="ui-worker")
        run = prefect.run_deployment("retrain-flowers/retrain-manual",
                                     run_params(synthetic_source, s3_bucket, epochs=1))
        assert prefect.wait_for_final_state(run, timeout=300)["state_type"] == "COMPLETED"
        prefect.stop_worker(worker)  # the form's run (the real defaults) must not start here
        report = prefect.api("/artifacts/filter", {"artifacts": {
            "key": {"any_": ["flowers102-evaluation-report"]}}})
    deployment = prefect.api("/deployments/name/retrain-flowers/retrain-manual")
    before = {r["id"] for r in prefect.api("/flow_runs/filter", {})}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(f"{prefect.url}/artifacts/artifact/{report[0]['id']}")
        page.wait_for_function("document.images.length >= 2 && "
                               "Array.from(document.images).every(i => i.complete)",
                               timeout=60_000)
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.naturalWidth])")
        page.screenshot(path=str(prefect.root / "ui-report.png"), full_page=True)

        page.goto(f"{prefect.url}/deployments/deployment/{deployment['id']}/run")
        page.get_by_text("Architecture").first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        page.screenshot(path=str(prefect.root / "ui-form.png"), full_page=True)
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 60
        while not (submitted := [r for r in prefect.api("/flow_runs/filter", {})
                                 if r["id"] not in before]):
            assert time.monotonic() < deadline, "submitting the form created no run"
            page.wait_for_timeout(500)
        browser.close()

    assert dict(images).keys() == {"Confusion matrix (row-normalised)", "Training curves"}
    assert all(width > 100 for _, width in images), images
    for title in ("Recipe", "Architecture", "Transfer strategy", "Augmentation", "Optimizer",
                  "Learning rate", "GPUs per node", "Training timeout (seconds)",
                  "Empty: the recipe's value."):
        assert title in text, title
    for raw_name in ("Lr", "Nproc Per Node", "Timeout S", "params"):
        assert raw_name not in text.splitlines(), raw_name
    # The parameter group has its title and is not "(Optional)": every run has its params.
    # Fields inside it are: left out, they take the model's default (or the recipe's), and a
    # required field would make the API refuse `-p 'params={"gate": {"force": true}}'`.
    assert "Retrain settings" in text.splitlines() and "Retrain settings (Optional)" not in text
    assert "Epochs (Optional)" in text.splitlines()  # empty: the recipe's value
    assert len(submitted) == 1
    prefect.api(f"/flow_runs/{submitted[0]['id']}", method="DELETE")
    training = submitted[0]["parameters"]["params"]["training"]
    assert training == {"recipe": "default", "device": "auto", "nproc_per_node": 1,
                        "timeout_s": 7200}, training  # nothing overrides the recipe


def test_a_promotion_starts_a_rescore_of_the_standing_collection(
        prefect_stack: LocalPrefect) -> None:
    """deploy/automations/rescore-on-promotion.yaml: a flowerml.model.promoted event starts the
    score-images deployment (cpu pool, typed form) for that exact version, on the collection the
    Prefect variables name. No cpu worker runs here: the run is checked, then removed."""
    import uuid
    from datetime import UTC, datetime

    prefect = prefect_stack
    deployment = prefect.api("/deployments/name/score-images/score-images")
    assert deployment["work_pool_name"] == "cpu" and deployment["entrypoint"] == \
        "flows.score.score_images"
    assert deployment["enforce_parameter_schema"] and not deployment["schedules"]
    form = deployment["parameter_openapi_schema"]["definitions"]["ScoreParams"]
    assert set(form["required"]) == {"input", "output"}
    assert form["properties"]["runtime"]["enum"] == ["auto", "onnx", "torch"]
    prefect.prefect("variable", "set", "flowerml_standing_collection", "s3://photos/standing",
                    "--overwrite")
    prefect.prefect("variable", "set", "flowerml_standing_scores", "s3://ml/scores",
                    "--overwrite")
    prefect.apply_automations(REPO / "deploy/automations/rescore-on-promotion.yaml")
    [automation] = [a for a in prefect.api("/automations/filter", {})
                    if a["name"] == "flowerml-rescore-on-promotion"]
    runs: list[dict] = []
    try:
        prefect.api("/events", [{  # type: ignore[arg-type]
            "id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(),
            "event": "flowerml.model.promoted",
            "resource": {"prefect.resource.id": "flowerml.model.flowers102",
                         "prefect.resource.name": "flowers102"},
            "payload": {"version": 7, "alias": "production"}}])
        deadline = time.monotonic() + 60
        while not (runs := prefect.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {
                "any_": [deployment["id"]]}}})):
            assert time.monotonic() < deadline, "the promotion started no score-images run"
            time.sleep(1)
        assert [r["parameters"] for r in runs] == [{"params": {
            "input": "s3://photos/standing", "output": "s3://ml/scores",
            "model": "flowers102:7", "runtime": "auto"}}]
    finally:
        prefect.api(f"/automations/{automation['id']}", method="DELETE")
        for run in runs:
            prefect.api(f"/flow_runs/{run['id']}", method="DELETE")
