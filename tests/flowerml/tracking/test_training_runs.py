"""Training runs mirrored to a real MLflow server (`flowerml train` with FLOWERML_MLFLOW_URI):
the resolved config as params, each epoch's metrics at its step, the run's tags, a resumed run
logging into the same MLflow run without a duplicate step, an evaluation's figures and files,
a server killed mid-run (training completes, the missed epoch caught up), and an unreachable
server at start (one line, exit 2; a warning when not required)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.tracking.training_runs import RUN_ID_TAG, RunTracker, find_run
from flowerml.training.runs import RunFiles
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.mlflow_servers import MlflowServer
from tests.helpers.network import free_port
from tests.helpers.stores import StoreAndCache
from tests.helpers.synthetic import DATASET, TINY_SPEC, SyntheticData

pytestmark = pytest.mark.slow

EXPERIMENT = f"flowerml/{DATASET}"
TRAIN = ("train", "--recipe", "demo", "--arch", "mobilenet_v3_small", "--image-size", "32",
         "--batch-size", "16", "--device", "cpu", "--workers", "0", "--json")
"""The cheapest run that still trains: the mirror is the point, not the model (one step an
epoch: the tiny dataset's 12 training images in one batch)."""


@pytest.fixture
def published(synthetic_data: SyntheticData, tmp_path: Path) -> StoreAndCache:
    """A private store with the tiny dataset published, and its cache."""
    return synthetic_data.copy(synthetic_data.published(TINY_SPEC), tmp_path / "data")


def train(published: StoreAndCache, server_url: str, run_id: str, epochs: int,
          *extra: str, env: dict[str, str] | None = None):
    store, cache = published
    return invoke(*TRAIN, "--epochs", str(epochs), "--run-id", run_id, *extra,
                  env={"FLOWERML_MLFLOW_URI": server_url, **(env or {})},
                  store=store, cache=cache)


def steps(client, mlflow_run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(mlflow_run_id,
                                                                                  key))


def mlflow_run(client, run_id: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_a_run_is_an_mlflow_run_with_its_config_metrics_and_tags(
        published: StoreAndCache, mlflow_tracking: MlflowServer, mlflow_client) -> None:
    result = train(published, mlflow_tracking.url, "tracked", 2)
    assert result.exit_code == 0, result.output
    run = mlflow_run(mlflow_client, "tracked")
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    record = RunFiles(published.store, "tracked").record()
    config = json.loads((published.store.root / "runs/tracked/config.json").read_text())["config"]
    assert run.data.params["arch"] == "mobilenet_v3_small" and run.data.params["epochs"] == "2"
    assert run.data.params["image_size"] == "32" and set(config) <= set(run.data.params)
    tags = run.data.tags
    assert tags["flowerml.dataset_version"] == record.dataset.version
    assert tags["flowerml.manifest_sha256"] == record.dataset.manifest_sha256
    assert tags["flowerml.device"] == "cpu"
    assert len(tags["mlflow.source.git.commit"]) == 40
    rows = RunFiles(published.store, "tracked").read_history()
    for key in ("train_loss", "train_top1", "valid_top1", "lr"):
        assert steps(mlflow_client, run.info.run_id, key) == [
            (row["epoch"], pytest.approx(row[key], abs=1e-5)) for row in rows], key
    assert [step for step, _ in steps(mlflow_client, run.info.run_id, "valid_top1")] == [1, 2]


def test_no_secret_lands_in_params_or_tags(published: StoreAndCache,
                                           mlflow_tracking: MlflowServer, mlflow_client) -> None:
    secret_uri = mlflow_tracking.url.replace("http://", "http://alice:hunter2@")
    result = train(published, secret_uri, "secretive", 1,
                   "--mlflow-tag", "prefect.flow_run_url=http://prefect/runs/1?token=hunter2",
                   env={"MLFLOW_TRACKING_TOKEN": "hunter2", "AWS_SECRET_ACCESS_KEY": "hunter2"})
    assert result.exit_code == 0, result.output
    run = mlflow_run(mlflow_client, "secretive")
    shown = json.dumps([run.data.params, run.data.tags])
    assert "hunter2" not in shown and "alice" not in shown, shown
    assert "hunter2" not in result.output
    assert run.data.tags["prefect.flow_run_url"] == "http://prefect/runs/1?<redacted>"


def test_a_resumed_run_logs_into_the_same_run_without_duplicate_steps(
        published: StoreAndCache, mlflow_tracking: MlflowServer, mlflow_client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed right after epoch 2's checkpoint, before MLflow heard of it: the resumed run
    logs epoch 2 from its checkpoint's history, then 3, each once."""
    log_epoch = RunTracker.log_epoch

    class Killed(BaseException):  # as SIGKILL would: nothing after it runs in the process
        pass

    def die_at_epoch_2(self, row):
        if row["epoch"] == 2:
            raise Killed
        log_epoch(self, row)

    monkeypatch.setattr(RunTracker, "log_epoch", die_at_epoch_2)
    with pytest.raises(Killed):
        train(published, mlflow_tracking.url, "resumed", 3)
    assert json.loads((published.store.root / "runs/resumed/checkpoint.json").read_text())[
        "epoch"] == 2
    first = mlflow_run(mlflow_client, "resumed")
    assert [s for s, _ in steps(mlflow_client, first.info.run_id, "valid_top1")] == [1]

    monkeypatch.setattr(RunTracker, "log_epoch", log_epoch)
    result = train(published, mlflow_tracking.url, "resumed", 3)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_epoch"] == 2
    run = mlflow_run(mlflow_client, "resumed")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    rows = RunFiles(published.store, "resumed").read_history()
    for key in ("train_loss", "valid_top1", "lr"):
        history = mlflow_client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
        assert steps(mlflow_client, run.info.run_id, key) == [
            (row["epoch"], pytest.approx(row[key], abs=1e-5)) for row in rows], key


def test_an_evaluation_adds_its_figures_and_report(
        published: StoreAndCache, mlflow_tracking: MlflowServer, mlflow_client) -> None:
    assert train(published, mlflow_tracking.url, "evaluated", 1).exit_code == 0
    store, cache = published
    result = invoke("evaluate", "--run", "evaluated", "--device", "cpu", "--workers", "0",
                    "--json", env={"FLOWERML_MLFLOW_URI": mlflow_tracking.url},
                    store=store, cache=cache)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run = mlflow_run(mlflow_client, "evaluated")
    for name in ("top1", "top5", "mean_class_accuracy"):
        assert run.data.metrics[f"test_{name}"] == pytest.approx(summary[name]), name
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "eval/test")}
    assert {"eval/test/report.md", "eval/test/confusion.png"} <= artifacts, artifacts


def test_a_server_killed_mid_run_does_not_stop_training(
        published: StoreAndCache, mlflow_tracking: MlflowServer, mlflow_client,
        caplog: pytest.LogCaptureFixture) -> None:
    """Killed after epoch 1 was logged, started again after epoch 2 failed to log: training
    completes, one warning says epoch 2 waits, and epoch 3 brings epoch 2 with it."""
    from flowerml.core.recipes import build_config
    from flowerml.tracking.server import TrackingServer
    from flowerml.training.fit import fit

    store, cache = published
    tracker = RunTracker(TrackingServer(mlflow_tracking.url), dataset=DATASET, run_id="outage")
    tracker.begin({"epochs": 3}, {"flowerml.device": "cpu"})

    def on_event(event: dict) -> None:
        tracker.observe(event)
        if event.get("event") == "epoch" and event["epoch"] == 1:
            mlflow_tracking.kill()
        if event.get("event") == "epoch" and event["epoch"] == 2:
            assert tracker.pending and tracker.pending[0]["epoch"] == 2
            mlflow_tracking.start()

    with caplog.at_level("WARNING", logger="flowerml.tracking"):
        result = fit(build_config("demo", arch="mobilenet_v3_small", image_size=32,
                                  batch_size=16, epochs=3), store=store,
                     dataset=DATASET, run_id="outage", cache_dir=cache, device="cpu",
                     workers=0, on_event=on_event)
        assert tracker.finish()
    assert result.epochs_run == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0] == (f"MLflow server {mlflow_tracking.url} did not answer (connection "
                           "refused): epoch 2 is not logged yet (it will be once the server "
                           "answers)")
    run_id = find_run(tracker.server, EXPERIMENT, "outage")
    assert [s for s, _ in steps(mlflow_client, run_id, "valid_top1")] == [1, 2, 3]


def test_a_mirror_that_breaks_is_a_warning_and_training_goes_on(
        published: StoreAndCache, mlflow_tracking: MlflowServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, event):
        raise RuntimeError("mirror broke")

    monkeypatch.setattr(RunTracker, "observe", broken)
    result = train(published, mlflow_tracking.url, "broken-mirror", 1)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs_run"] == 1
    assert result.stderr.count("flowerml: warning: MLflow run of broken-mirror not updated: "
                               "mirror broke\n") == 2  # the start and the epoch


def test_a_server_still_down_at_the_end_is_one_warning_and_caught_up_on_resume(
        published: StoreAndCache, mlflow_tracking: MlflowServer, mlflow_client,
        caplog: pytest.LogCaptureFixture) -> None:
    from flowerml.tracking.server import TrackingServer

    tracker = RunTracker(TrackingServer(f"http://127.0.0.1:{free_port()}"), dataset=DATASET,
                         run_id="behind")
    with caplog.at_level("WARNING", logger="flowerml.tracking"):
        tracker.begin({"epochs": 2}, {})
        tracker.observe({"event": "epoch", "epoch": 1, "valid_top1": 0.5})
        assert not tracker.finish()
    assert [r.getMessage().split(": ", 1)[-1] for r in caplog.records][-1] == (
        "epochs from 1 are not logged; it catches up when the run resumes (flowerml train "
        "--run-id behind)")
    again = RunTracker(TrackingServer(mlflow_tracking.url), dataset=DATASET, run_id="behind")
    again.begin({"epochs": 2}, {}, [{"epoch": 1, "valid_top1": 0.5}])
    again.observe({"event": "epoch", "epoch": 2, "valid_top1": 0.75})
    assert again.finish()
    assert steps(mlflow_client, again.mlflow_run_id, "valid_top1") == [(1, 0.5), (2, 0.75)]


def test_an_unreachable_server_at_start_is_one_line_before_training(
        published: StoreAndCache) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = train(published, url, "unreachable", 1)
    assert_refused(result, f"flowerml: error: MLflow tracking server {url} is unreachable "
                           "(connection refused); start it, or set "
                           "FLOWERML_MLFLOW_REQUIRED=false to train without tracking")
    assert not (published.store.root / "runs/unreachable").exists()


def test_not_required_an_unreachable_server_is_a_warning_and_training_runs(
        published: StoreAndCache) -> None:
    url = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    result = train(published, url, "untracked", 1, env={"FLOWERML_MLFLOW_REQUIRED": "false"})
    assert result.exit_code == 0, result.output
    assert (f"flowerml: warning: MLflow tracking server http://127.0.0.1:"
            f"{url.rsplit(':', 1)[1]} is unreachable (connection refused); training without "
            "tracking (FLOWERML_MLFLOW_REQUIRED=false)") in result.stderr
    assert "hunter2" not in result.output
    assert json.loads(result.stdout)["epochs_run"] == 1


def test_without_mlflow_installed_a_run_trains_untracked_and_a_uri_names_the_extra(
        published: StoreAndCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base install: mlflow cannot be imported. Without a URI nothing asks for it; with one,
    one line names the pip install, before training."""
    import sys

    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    store, cache = published
    result = invoke(*TRAIN, "--epochs", "1", "--run-id", "plain", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    assert "MLflow" not in result.output and json.loads(result.stdout)["epochs_run"] == 1
    refused = train(published, "http://127.0.0.1:5000", "needs-extra", 1)
    assert_refused(refused, "flowerml: error: tracking to MLflow (--mlflow, FLOWERML_MLFLOW_URI) "
                            "needs the mlflow extra: pip install 'flowerml[mlflow]'")
    assert not (published.store.root / "runs/needs-extra").exists()
