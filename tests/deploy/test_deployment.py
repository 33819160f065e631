"""The real deployment path on CPU, as deploy/README.md runs it: a Prefect server, the pools
from deploy/pools (the gpu pool's concurrency limit 1), `prefect deploy --all`, the operations
automations, process workers, and the runs they execute, on a moto S3 store.

It kills what production loses: the worker and the flow-run process are SIGKILLed in the middle
of training. Without a human, the zombie automation marks the run Crashed (its heartbeats stop),
the recovery automation reschedules it, a restarted worker picks it up and the same flow run
resumes its training run from the last checkpoint. A manual run submitted meanwhile never trains
at the same time (one GPU, one limit), and the scheduler's runs each get their own training run.
How a worker stops (systemd, one SIGTERM, idle or training) is in test_deployment_workers.py, on
a server of its own (tests/deploy/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from flowerml.core.launch import process_alive
from flowerml.io.storage import S3Options
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.versions import Registry
from flowerml.training.runs import RunFiles
from flows.retrain import training_run_id
from tests.helpers.deployment import (
    NEW_DATA_TRIGGER,
    REPO,
    BatchedPrefect,
    assert_nothing_left_running,
    command_line,
    descendants,
    run_params,
    short_zombie_automations,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_scheduled_runs_each_get_their_own_training_run(prefect_stack: BatchedPrefect,
                                                        tmp_path: Path) -> None:
    prefect = prefect_stack
    weekly = prefect.api("/deployments/name/retrain-flowers/retrain-weekly")
    deadline = time.monotonic() + 120
    while len(runs := prefect.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {
            "any_": [weekly["id"]]}}})) < 2:
        assert time.monotonic() < deadline, "the scheduler made no weekly runs"
        time.sleep(0.2)
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


def test_a_published_dataset_starts_retrain_on_new_data(prefect_stack: BatchedPrefect) -> None:
    """deploy/prefect.yaml's trigger: a flowerml.dataset.published event of flowers102 makes a
    run of retrain-on-new-data, with its min_new_images; one of another dataset does not."""
    prefect = prefect_stack
    name = "retrain-flowers/retrain-on-new-data"
    deployment = prefect.api(f"/deployments/name/{name}")
    assert deployment["parameters"]["params"]["min_new_images"] == 50
    known = {run["id"] for run in prefect.runs_of(name)}
    prefect.enable_automation(NEW_DATA_TRIGGER, True)
    try:
        for dataset in ("tulips", "flowers102"):
            prefect.prefect("event", "emit", "flowerml.dataset.published", "--resource-id",
                            f"flowerml.dataset.{dataset}", "--payload", json.dumps(
                                {"version": "v2", "parent": "v1", "added": {"train": 60}}))
        run_id = prefect.wait_for_triggered_run(name, known, timeout=120)
        # The other dataset's event went first: by the time this one's run exists, it has been
        # evaluated (the server reads its event stream in order, two at a time); a second
        # more for an action it would have queued.
        time.sleep(1)
        triggered = [run for run in prefect.runs_of(name) if run["id"] not in known]
    finally:
        prefect.enable_automation(NEW_DATA_TRIGGER, False)
    assert [run["id"] for run in triggered] == [run_id]
    assert triggered[0]["parameters"]["params"]["min_new_images"] == 50
    prefect.api(f"/flow_runs/{run_id}", method="DELETE")  # no later worker may take it


def test_the_notifications_apply_with_a_block(prefect_stack: BatchedPrefect) -> None:
    """deploy/README.md section 9: save a notification block, apply notify-promotion.yaml."""
    prefect = prefect_stack
    saved = prefect.command("python", "-c", "from prefect.blocks.notifications import "
                            "SlackWebhook; SlackWebhook(url='https://hooks.slack.com/services/x')"
                            ".save('flowerml-alerts', overwrite=True)")
    assert saved.returncode == 0, saved.output[-2000:]
    refused = prefect.command("python", "deploy/automations/apply.py",
                              "deploy/automations/notify-promotion.yaml")
    assert refused.returncode != 0 and "give --block TYPE/NAME" in refused.errors
    done = prefect.command("python", "deploy/automations/apply.py",
                           "deploy/automations/notify-promotion.yaml", "--block",
                           "slack-webhook/flowerml-alerts")
    assert done.returncode == 0, done.output[-2000:]
    automations = {a["name"]: a for a in prefect.api("/automations/filter", {})}
    alert = automations["flowerml-weekly-retrain-needs-attention"]
    assert set(alert["trigger"]["expect"]) == {"prefect.flow-run.Failed",
                                               "prefect.flow-run.Crashed",
                                               "prefect.flow-run.Late"}
    block = alert["actions"][0]["block_document_id"]
    assert block != "00000000-0000-0000-0000-000000000000"
    assert {automations[n]["actions"][0]["block_document_id"] for n in (
        "flowerml-model-promoted", "flowerml-model-rejected")} == {block}


KILLED_EPOCHS = 10  # ~0.2 s each here: the kill comes after the first, well before the last


def test_a_killed_worker_run_resumes_without_a_human(prefect_stack: BatchedPrefect, tmp_path: Path,
                                                     s3_bucket: str, moto_endpoint: str,
                                                     synthetic_source: Path) -> None:
    prefect = prefect_stack
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))
    # --limit 2: the worker could take both runs; only the pool's limit keeps them apart.
    worker = prefect.start_worker("gpu", "--limit", "2", name="worker-1")
    killed = prefect.run_deployment("retrain-flowers/retrain-weekly",
                                    run_params(synthetic_source, s3_bucket, epochs=KILLED_EPOCHS))
    waiting = prefect.run_deployment("retrain-flowers/retrain-manual",
                                     run_params(synthetic_source, s3_bucket, epochs=1))
    run_id = training_run_id("flowers102", killed)
    checkpoint = RunFiles(store, run_id).key("checkpoint.json")

    def one_training_at_a_time() -> None:
        states = [r["state_type"] for r in prefect.api("/flow_runs/filter", {
            "flow_runs": {"id": {"any_": [killed, waiting]}}})]
        assert len(states) == 2 and sum(s in ("PENDING", "RUNNING") for s in states) <= 1, states

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
    assert result["resumed_from_epoch"] >= 1 and result["epochs_run"] == KILLED_EPOCHS
    registry = Registry(store, "flowers102")
    assert {v.card["lineage"]["run_id"] for v in registry.versions()} == {
        run_id, training_run_id("flowers102", waiting)}
    prefect.stop_worker(restarted)
    event = wait_for_event(prefect, "flowerml.model.promoted")
    assert event["resource"]["prefect.resource.id"] == "flowerml.model.flowers102"
    assert event["payload"]["version"] in (1, 2) and "top1" in event["payload"]["metrics"]
    print(f"\ncrash recovery: killed -> Completed in {recovered_after:.0f} s")


def wait_for_event(prefect: BatchedPrefect, name: str, timeout: float = 30) -> dict:
    """The first event of that name the server has stored (it persists them asynchronously)."""
    deadline = time.monotonic() + timeout
    while not (page := prefect.api("/events/filter", {"filter": {"event": {"name": [name]}}}))[
            "events"]:
        assert time.monotonic() < deadline, f"no {name} event stored within {timeout} s"
        time.sleep(0.2)
    return page["events"][0]


CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_ui_shows_a_form_of_dropdowns_and_the_report_with_its_plots(
        prefect_stack: BatchedPrefect, s3_bucket: str, synthetic_source: Path) -> None:
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
                        "timeout_s": 7200, "checkpoint_every": 1}, training  # the recipe's


def test_a_promotion_starts_a_rescore_of_the_standing_collection(
        prefect_stack: BatchedPrefect) -> None:
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
    assert form["properties"]["runtime"]["enum"] == ["auto", "onnx", "onnx-int8", "torch"]
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
            time.sleep(0.2)
        assert [r["parameters"] for r in runs] == [{"params": {
            "input": "s3://photos/standing", "output": "s3://ml/scores",
            "model": "flowers102:7", "runtime": "auto"}}]
    finally:
        prefect.api(f"/automations/{automation['id']}", method="DELETE")
        for run in runs:
            prefect.api(f"/flow_runs/{run['id']}", method="DELETE")
