"""The retrain flow end to end under Prefect's harness, on a moto S3 store.

One story, in order: the first run promotes; a worse candidate under a higher threshold
registers but is rejected with both reasons; a forced promotion is recorded and rolled back; a
failure inside register leaves no COMMITTED version and the alias unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import flows.retrain as retrain_module
from flowerml.io.storage import S3Options
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.versions import Registry
from flows.retrain import RetrainParams, retrain_flowers
from flows.run_once import describe_parameter_error
from tasks.registry import register_task
from tests.helpers.additions import split_folders
from tests.helpers.decodes import record_decodes
from tests.helpers.prefect_runs import task_run_times

# 32 px: the demo's ResNet-18 at seed 0 reaches test top-1 0.78 here (0.69 at 40 px).
GOOD = {"recipe": "demo", "epochs": 8, "image_size": 32, "batch_size": 8, "device": "cpu",
        "workers": 0, "checkpoint_every": 8}
# The candidates that lose (and production once forced): one epoch of a model that learns
# nothing at lr 1e-7 (test top-1 0.25, chance). MobileNetV3-Small: its kind is not the point,
# and its 6 MB weights and 18 MB checkpoint cost the store (moto) less than ResNet-18's 45/134.
BAD = {**GOOD, "arch": "mobilenet_v3_small", "epochs": 1, "lr": 1e-7}


@pytest.fixture
def story(prefect_harness: None, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str,
          s3_bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    source = tmp_path / "src"
    write_synthetic_archive(source, SyntheticSpec(classes=4, per_class=16, image_size=56, seed=7))
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))

    def run(training: dict, export_onnx: bool = False, distill: dict | None = None,
            force_train: bool = False, return_state: bool = False, **gate) -> Any:
        params = RetrainParams(source=str(source), store=f"s3://{s3_bucket}/ml",
                               training=training, gate={"threshold": 0.5, **gate},
                               export_onnx=export_onnx, distill=distill or {},
                               force_train=force_train)
        return retrain_flowers(params, return_state=return_state)

    return run, Registry(store, "flowers102")


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 70 s on 2 quiet cores: five flow runs, four that train
def test_retrain_story(story, monkeypatch: pytest.MonkeyPatch) -> None:
    run, registry = story
    decodes = record_decodes(monkeypatch)

    first = run(GOOD, export_onnx=True)
    # The test split was decoded once, ahead, on the idle thread, while training ran.
    assert [d.thread for d in decodes if d.file.startswith("test-")] == ["prepare-test"]
    times = task_run_times(first["run_id"].removeprefix("flowers102-"),
                           ("prepare the test split", "train ", "evaluate "))
    assert times["prepare the test split"][0] <= times["train "][1], times
    assert times["prepare the test split"][1] <= times["evaluate "][0], times
    assert first["promoted"] and first["version"] == 1, first["reasons"]
    export = first["export"]
    assert export["parity_passed"]
    assert export["parity_images"] == first["metrics"]["n"]  # the whole test split
    assert export["parity_reference"] == "evaluation-logits"  # PyTorch ran once on test
    assert export["int8_images"] == first["metrics"]["n"]  # export_int8 is on by default
    assert registry.read_attachment(1, "model.int8.onnx") is not None
    assert export["location"] == f"{registry.store.uri}/registry/flowers102/versions/000001/" \
                                 "model.onnx"
    assert export["sha256"] == json.loads(registry.read_attachment(1, "export.json"))["sha256"]
    # The export and the report's publishing ran side by side; promotion waited for both.
    times = task_run_times(first["run_id"].removeprefix("flowers102-"),
                           ("export ", "publish the evaluation", "promote "))
    (export_start, export_end), (report_start, report_end) = (times["export "],
                                                              times["publish the evaluation"])
    assert report_start < export_end and export_start < report_end, times
    assert times["promote "][0] >= max(export_end, report_end), times
    assert "no production model yet: decided by the threshold alone" in first["reasons"]
    assert registry.alias().version == 1
    card = registry.get(1).card
    assert card["lineage"]["run_id"] == first["run_id"]
    assert card["metrics"]["top1"] == first["metrics"]["top1"]
    assert card["gate"]["promote"] is True and card["software"]["torch"]

    assert latest_artifacts("flowers102") == {
        "flowers102-evaluation-report": "markdown", "flowers102-per-class-accuracy": "table",
        "flowers102-promotion-decision": "markdown", "flowers102-registry-entry": "markdown",
        "flowers102-onnx-export": "markdown"}
    assert "parity passed: top-1 agreement 100.0000%" in latest_artifact_data(
        "flowers102-onnx-export")
    assert "## ONNX export" in latest_artifact_data("flowers102-promotion-decision")
    entry = latest_artifact_data("flowers102-registry-entry")
    assert f"{registry.store.uri}/registry/flowers102/versions/000001/" in entry
    assert "flowerml predict IMAGE.jpg --model flowers102:1" in entry

    # Nothing changed since: the same data and config again is up to date, no training.
    state = run(GOOD, return_state=True)
    again = state.result()
    assert (state.type.value, state.name) == ("COMPLETED", "Up to date")
    assert again["up_to_date"] and not again["promoted"], again
    assert (again["production"], again["dataset_version"]) == ("flowers102:000001",
                                                              first["dataset_version"])
    assert again["reasons"][0].startswith("up to date: flowers102:000001 was trained on this")
    assert [v.version for v in registry.versions()] == [1]
    assert latest_artifact_data("flowers102-up-to-date").startswith("# Up to date")

    # One rejected candidate fails both checks: the floor and the regression against production
    # (they used to be two runs; the gate reports every reason either way).
    # Its distill stage (tests/flows/test_distill.py runs one) has no promoted model to learn
    # from: skipped, and said so.
    worse = run(BAD, threshold=0.999, distill={"enabled": True, "student": "resnet18"})
    assert not worse["promoted"] and worse["version"] == 2
    assert worse["distill"] == {"skipped": "the new model was not promoted: no student of it"}
    assert not Registry(registry.store, "flowers102-small").has_versions()
    assert any("< threshold 0.9990" in r for r in worse["reasons"]), worse["reasons"]
    assert worse["metrics"]["top1"] < first["metrics"]["top1"] - 0.005
    assert any("regression" in r for r in worse["reasons"]), worse["reasons"]
    assert registry.get(2).committed and registry.alias().version == 1
    # Both evaluations kept their per-image predictions: the gate paired them, the card says so.
    assert any(r.startswith("McNemar exact test vs production v000001") for r in
               worse["reasons"]), worse["reasons"]
    paired = registry.get(2).card["gate"]["paired"]
    assert paired["ran"] and paired["champion"] == "flowers102:000001", paired
    assert paired["n"] == worse["metrics"]["n"] and registry.get(1).card["gate"]["paired"] is None

    forced = run(BAD, threshold=0.0, force=True)
    assert forced["promoted"] and registry.alias().version == forced["version"] == 3
    history = registry.history()
    assert history[-1]["forced"] is True and history[-1]["to"] == 3

    def crash(self, version, sha):  # the last step of register: COMMITTED
        raise RuntimeError(f"simulated crash before committing version {version:06d}")

    # Production's own data and config (one epoch, so cheap to train again), trained as asked.
    with monkeypatch.context() as crashing:
        crashing.setattr(Registry, "_commit", crash)
        crashing.setattr(retrain_module, "register_task", register_task.with_options(retries=0))
        alias_before = registry.alias()
        with pytest.raises(RuntimeError):
            run(BAD, threshold=0.0, force=True, force_train=True)
    assert registry.alias() == alias_before
    newest = registry.versions()[-1]
    assert newest.version == 4 and not newest.committed

    restored = registry.rollback()  # past the version the crash left uncommitted
    assert restored.version == 1 and registry.history()[-1]["to"] == 1


def latest_artifacts(prefix: str) -> dict[str, str]:
    """Keyed artifacts whose key starts with `prefix`, and their types."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> dict[str, str]:
        async with get_client() as client:
            return {a.key: a.type for a in await client.read_latest_artifacts()
                    if a.key and a.key.startswith(prefix)}

    return asyncio.run(read())


def latest_artifact_data(key: str) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found[-1].data

    return asyncio.run(read())


# --- what the flow decides before it runs anything ---------------------------------------------


def test_scheduled_runs_created_together_get_their_own_training_runs() -> None:
    """The scheduler makes UUIDv7 flow-run ids: those created in the same second share their
    first 8 hex digits, which once named the training run, so weekly runs resumed each other."""
    from prefect._internal.uuid7 import uuid7

    ids = [uuid7() for _ in range(5)]
    assert len({str(i)[:8] for i in ids}) == 1  # the old prefix collides
    run_ids = [retrain_module.training_run_id("flowers102", i) for i in ids]
    assert len(set(run_ids)) == 5
    assert retrain_module.training_run_id("flowers102", ids[0]) == run_ids[0]  # a retry resumes
    assert run_ids[0] == f"flowers102-{ids[0]}"


@pytest.mark.parametrize(("run_count", "refused"), [(0, False), (1, False), (4, False),
                                                     (5, True), (9, True)])
def test_recoveries_are_bounded(run_count: int, refused: bool) -> None:
    if not refused:
        retrain_module.check_recoveries(run_count, limit=3)
        return
    with pytest.raises(retrain_module.RecoveryLimitReached,
                       match=f"crashed {run_count - 1} times and recovery_limit allows 3"):
        retrain_module.check_recoveries(run_count, limit=3)


@pytest.mark.slow
def test_a_recovered_run_past_its_limit_stops_before_any_work(
        prefect_harness: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The fifth start of one flow run: crashed four times, the automation resumed it 3 times.
    monkeypatch.setattr(retrain_module.flow_run, "run_count", 5, raising=False)
    params = RetrainParams(source=str(tmp_path / "missing"), store=str(tmp_path / "store"),
                           recovery_limit=3)
    with pytest.raises(retrain_module.RecoveryLimitReached, match="crashed 4 times"):
        retrain_flowers(params)
    assert not (tmp_path / "store").exists()


def test_the_form_offers_choices_titles_and_descriptions() -> None:
    schema = retrain_flowers.parameters.model_dump()["definitions"]
    training = schema["TrainingParams"]["properties"]
    assert list(training)[0] == "recipe"  # the form starts with the recipe
    for field, choice in [("recipe", "demo"), ("device", "cuda"), ("arch", "resnet152"),
                          ("strategy", "linear-probe"), ("augment", "tutorial"),
                          ("optimizer", "adamw")]:
        # a plain enum (a dropdown), not anyOf [enum, null] (a type toggle in the UI)
        assert choice in training[field]["enum"] and "anyOf" not in training[field], field
    assert training["epochs"]["minimum"] == 1 and "default" not in training["epochs"]
    assert training["lr"]["title"] == "Learning rate"
    assert training["nproc_per_node"]["title"] == "GPUs per node"
    assert training["timeout_s"]["title"] == "Training timeout (seconds)"
    assert training["timeout_s"]["default"] == retrain_module.TRAINING_TIMEOUT_S
    for field in ("epochs", "batch_size", "lr", "image_size"):
        assert "Empty: the recipe's value" in training[field]["description"], field


@pytest.mark.parametrize(("entrypoint", "title"), [
    ("flows.retrain:retrain_flowers", "Retrain settings"),
    ("flows.distill:distill_flowers", "Distillation settings"),
    ("flows.score:score_images", "Scoring settings")])
def test_each_flow_form_is_one_titled_required_group(entrypoint: str, title: str) -> None:
    """The UI labels the flow's one parameter with its schema title (else the raw `params`) and
    calls it "(Optional)" unless it is required: every run has its params."""
    import importlib

    module, name = entrypoint.split(":")
    schema = getattr(importlib.import_module(module), name).parameters.model_dump()
    assert schema["required"] == ["params"]
    assert schema["properties"]["params"]["title"] == title
    assert "default" not in schema["properties"]["params"]


@pytest.mark.parametrize(("training", "message"), [
    ({"recipe": "demoo"}, "training.recipe"),
    ({"arch": "resnet9"}, "training.arch"),
    ({"device": "gpu"}, "training.device"),
    ({"epochs": 0}, "training.epochs"),
    ({"arch": "resnet18", "freeze_stages": 6}, "--freeze-stages must be between 0 and 5"),
])
def test_typos_are_refused_before_a_run_starts(training: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        RetrainParams.model_validate({"training": training})
    assert message in describe_parameter_error(info.value, "retrain")


def test_training_params_resolve_through_the_recipe() -> None:
    params = RetrainParams.model_validate({"training": {"recipe": "demo", "epochs": 3}})
    config = params.training.config()
    assert config.arch == "resnet18" and config.epochs == 3 and config.weights == "none"


def test_a_dataset_of_ones_own_classes_trains_on_its_current_version(
        prefect_harness: None, local_store: LocalStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`source` official (the default) for a dataset published from an imagefolder: nothing is
    fetched, its CURRENT is trained on; `imagefolder:PATH` publishes the folder first."""
    from prefect import flow

    from flows.retrain import training_data

    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    folder = f"imagefolder:{split_folders(tmp_path / 'garden')}"

    @flow
    def data(source: str) -> dict:
        return training_data(RetrainParams(source=source, dataset="garden",
                                           store=str(local_store.root)))

    published = data(folder)
    assert published["classes"] == ["Rose", "daisy", "tulip"]
    assert data("official") == {"store": local_store.uri, "dataset": "garden",
                                "source": folder, "current": published["current"]}
