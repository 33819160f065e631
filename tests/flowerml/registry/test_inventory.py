"""Listing and describing runs and datasets, deleting a run, and the check a run's test
evaluation passes before it goes on a model card (flowerml.registry.inventory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowerml.core.errors import DatasetNotFound
from flowerml.data.manifest import read_current
from flowerml.io.storage_local import LocalStore
from flowerml.registry import inventory
from flowerml.training.runs import RunError, RunFiles, RunNotFound
from tests.helpers.stores import StoreAndCache, copy_tree
from tests.helpers.synthetic import DATASET, TINY_RUN, RegisteredRun


@pytest.fixture
def registered_copy(registered_run: RegisteredRun, tmp_path: Path) -> StoreAndCache:
    """A private copy of the registered run's store (tiny, evaluated, flowers102:000001)."""
    copy_tree(registered_run.store.root, tmp_path / "store")
    return StoreAndCache(LocalStore(tmp_path / "store"), registered_run.cache)


def write_run(store: LocalStore, run_id: str, files: dict[str, object]) -> None:
    for name, value in files.items():
        store.put_bytes(f"runs/{run_id}/{name}", json.dumps(value).encode())


def test_list_runs_shows_each_runs_state_and_registrations(registered_copy: StoreAndCache,
                                                           registered_run: RegisteredRun) -> None:
    store, _ = registered_copy
    record = RunFiles(store, TINY_RUN).read_json("config.json")
    write_run(store, "not-started", {"config.json": record})
    write_run(store, "interrupted", {"config.json": {**record, "config": {
        **record["config"], "epochs": 4}}, "checkpoint.json": {"key": "checkpoint-0123456789abcdef.pt", "sha256": "0" * 64,
                            "size": 1, "epoch": 2}})
    write_run(store, "leftovers", {"eval/test/metrics.json": {"top1": 0.5}})
    runs = {run.run_id: run for run in inventory.list_runs(store)}
    assert sorted(runs) == ["interrupted", "leftovers", "not-started", TINY_RUN]
    tiny = runs[TINY_RUN]
    version = read_current(store, DATASET)["version"]
    assert (tiny.status, tiny.dataset, tiny.dataset_version, tiny.arch) == (
        "finished", DATASET, version, "resnet18")
    assert (tiny.epochs_done, tiny.epochs, tiny.best_epoch) == (1, 1, 1)
    assert tiny.test_top1 == registered_run.metrics["top1"]
    assert tiny.registered == ["flowers102:000001"]
    assert tiny.location == f"{store.uri}/runs/{TINY_RUN}/"
    assert (runs["interrupted"].status, runs["interrupted"].epochs_done,
            runs["interrupted"].epochs) == ("incomplete", 2, 4)
    assert (runs["not-started"].status, runs["not-started"].epochs_done) == ("not started", 0)
    assert runs["leftovers"].status == "damaged"
    assert "no config.json" in runs["leftovers"].problem
    assert all(not run.registered for run_id, run in runs.items() if run_id != TINY_RUN)


def test_a_damaged_run_does_not_hide_the_others(registered_copy: StoreAndCache) -> None:
    store, _ = registered_copy
    store.put_bytes("runs/broken/config.json", b"{not json")
    write_run(store, "odd", {"config.json": {"config": {}}})
    runs = {run.run_id: run for run in inventory.list_runs(store)}
    assert runs[TINY_RUN].status == "finished"
    assert runs["broken"].status == "damaged"
    assert runs["broken"].problem == ("runs/broken/config.json: not valid JSON (key must be a "
                                      "string at line 1 column 2)")
    assert runs["odd"].status == "damaged"
    assert runs["odd"].problem == ("runs/odd/config.json: field config.arch: Field required "
                                   "(and 6 more)")


def test_describe_run_has_config_history_evaluations_and_locations(
        registered_copy: StoreAndCache, registered_run: RegisteredRun) -> None:
    store, _ = registered_copy
    details = inventory.describe_run(store, TINY_RUN)
    record = RunFiles(store, TINY_RUN).read_json("config.json")
    assert details.config == record["config"]
    assert details.manifest_sha256 == record["dataset"]["manifest_sha256"]
    assert [row["epoch"] for row in details.history] == [1]
    [test] = details.evaluations
    assert test.split == "test" and test.metrics == registered_run.metrics
    assert test.report == f"{store.uri}/runs/{TINY_RUN}/eval/test/report.md"
    assert test.dataset == f"{DATASET}@{record['dataset']['version']}"
    assert RunFiles(store, TINY_RUN).read_json("best.json")["sha256"].startswith(
        test.weights_sha256)
    assert details.files == len(list(store.list(f"runs/{TINY_RUN}/")))
    assert json.loads(json.dumps(details.to_json()))["evaluations"][0]["split"] == "test"


def test_unknown_and_malformed_run_ids(local_store: LocalStore) -> None:
    with pytest.raises(RunNotFound, match=f"run 'nope' not found on {local_store.uri}"):
        inventory.describe_run(local_store, "nope")
    with pytest.raises(RunNotFound, match="run 'nope' not found"):
        inventory.delete_run(local_store, "nope")
    with pytest.raises(RunError, match="run id must be letters"):
        inventory.describe_run(local_store, "../escape")
    assert inventory.list_runs(local_store) == []


def test_deleting_a_registered_run_is_refused_unless_forced(registered_copy: StoreAndCache,
                                                            ) -> None:
    store, _ = registered_copy
    before = [info.key for info in store.list("runs/")]
    with pytest.raises(inventory.RunRegistered,
                       match=r"run 'tiny' is the source of registry version flowers102:000001; "
                             r"--force deletes it"):
        inventory.delete_run(store, TINY_RUN)
    assert [info.key for info in store.list("runs/")] == before
    deleted = inventory.delete_run(store, TINY_RUN, force=True)
    assert (deleted.files, deleted.registered, deleted.forced) == (
        len(before), ["flowers102:000001"], True)
    assert deleted.location == f"{store.uri}/runs/{TINY_RUN}/"
    assert list(store.list("runs/")) == []
    assert store.exists("registry/flowers102/versions/000001/model.safetensors")


def test_a_delete_cut_short_leaves_a_run_that_starts_afresh(registered_copy: StoreAndCache,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The pointers go first and config.json last: a deletion killed half-way leaves a run that
    never finished an epoch (training it again starts over), and deleting again finishes."""
    from flowerml.training.run_record import has_trained

    store, _ = registered_copy
    deleted: list[str] = []
    original = LocalStore.delete

    def dies_after_three(self: LocalStore, key: str) -> None:
        if len(deleted) == 3:
            raise KeyboardInterrupt
        deleted.append(key)
        original(self, key)

    monkeypatch.setattr(LocalStore, "delete", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        inventory.delete_run(store, TINY_RUN, force=True)
    monkeypatch.setattr(LocalStore, "delete", original)
    assert deleted == [f"runs/{TINY_RUN}/{name}"
                       for name in ("result.json", "checkpoint.json", "best.json")]
    run = RunFiles(store, TINY_RUN)
    assert run.exists() and not has_trained(run)
    [summary] = [r for r in inventory.list_runs(store) if r.run_id == TINY_RUN]
    assert summary.status == "not started"
    inventory.delete_run(store, TINY_RUN, force=True)
    assert list(store.list("runs/")) == []


def test_current_test_evaluation_refuses_what_a_card_must_not_claim(
        registered_copy: StoreAndCache) -> None:
    store, _ = registered_copy
    run = RunFiles(store, TINY_RUN)
    record, evaluation = inventory.current_test_evaluation(store, TINY_RUN)
    assert record == run.read_json("config.json") and evaluation.metrics["n"] > 0

    report_key = run.key("eval/test/report.md")
    report = store.get_bytes(report_key)
    version = record["dataset"]["version"]
    store.put_bytes(report_key, report.replace(f"@{version}".encode(), b"@0123456789ab"))
    with pytest.raises(inventory.EvaluationMissing,
                       match=rf"evaluated on {DATASET}@0123456789ab, not on {DATASET}@{version} "
                             r"it trained on: run flowerml evaluate --run tiny first"):
        inventory.current_test_evaluation(store, TINY_RUN)
    store.put_bytes(report_key, report)

    # Trained further: the best weights are no longer the evaluated ones.
    tensors, _ = run.load_weights()
    run.save_weights({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()},
                     epoch=2, valid_top1=1.0)
    with pytest.raises(inventory.EvaluationMissing,
                       match="test evaluation is of other weights .*run flowerml evaluate "
                             "--run tiny first"):
        inventory.current_test_evaluation(store, TINY_RUN)

    for name in ("metrics.json", "report.md"):
        store.delete(run.key(f"eval/test/{name}"))
    with pytest.raises(inventory.EvaluationMissing,
                       match="run 'tiny' has no test evaluation: run flowerml evaluate --run "
                             "tiny first"):
        inventory.current_test_evaluation(store, TINY_RUN)
    store.delete(run.key("result.json"))
    with pytest.raises(RunError, match="run 'tiny' has not finished training"):
        inventory.current_test_evaluation(store, TINY_RUN)


# --------------------------------------------------------------------------------------------
# Datasets


def add_version(store: LocalStore, version: str, **manifest_changes: object) -> None:
    """A second version beside CURRENT's: its images and a changed copy of its manifest."""
    current = read_current(store, DATASET)["version"]
    base = store.root / "datasets" / DATASET
    copy_tree(base / current, base / version)
    manifest = json.loads((base / current / "manifest.json").read_bytes())
    (base / version / "manifest.json").unlink()
    store.put_bytes(f"datasets/{DATASET}/{version}/manifest.json",
                    json.dumps({**manifest, "version": version, **manifest_changes}).encode())


def test_datasets_list_and_show(local_published, local_store: LocalStore) -> None:
    current = local_published.version
    add_version(local_store, "000000000000", synthetic=True, quarantined=1)
    local_store.put_bytes(f"datasets/{DATASET}/000000000000/quarantine.json", json.dumps(
        [{"image": "image_00001.jpg", "split": "train", "label": 1,
          "reason": "cannot identify image file"}]).encode())
    half = f"datasets/{DATASET}/ffffffffffff/train/001/image_00002.jpg"
    local_store.put_bytes(half, b"\xff\xd8")

    [listed] = inventory.list_datasets(local_store)
    assert listed.name == DATASET and listed.current == current
    assert listed.location == f"{local_store.uri}/datasets/{DATASET}/"
    assert [v.version for v in listed.versions] == [current, "000000000000", "ffffffffffff"]
    first, other, incomplete = listed.versions
    assert first.current and first.complete and first.counts == {
        "train": 8, "valid": 8, "test": 8}
    assert (first.classes, first.quarantined) == (4, 0)
    assert first.location == f"{local_store.uri}/datasets/{DATASET}/{current}/"
    assert (other.current, other.synthetic, other.quarantined) == (False, True, 1)
    assert not incomplete.complete and "interrupted ingest" in incomplete.problem
    assert first.quarantine is None  # listing reads no quarantine files

    shown = inventory.describe_dataset(local_store, DATASET)
    quarantine = {v.version: v.quarantine for v in shown.versions}
    assert quarantine[current] == []
    assert quarantine["000000000000"][0]["reason"] == "cannot identify image file"
    assert quarantine["ffffffffffff"] is None
    assert json.loads(json.dumps(shown.to_json()))["versions"][1]["quarantine"][0]["image"] \
        == "image_00001.jpg"


def test_synthetic_is_read_from_the_manifest(local_published, local_store: LocalStore) -> None:
    manifest = json.loads(local_store.get_bytes(
        f"datasets/{DATASET}/{local_published.version}/manifest.json"))
    [listed] = inventory.list_datasets(local_store)
    assert listed.versions[0].synthetic is (manifest.get("synthetic") is True)
    add_version(local_store, "111111111111", synthetic=False)
    add_version(local_store, "222222222222")
    versions = {v.version: v for v in inventory.list_datasets(local_store)[0].versions}
    assert versions["111111111111"].synthetic is False
    assert versions["222222222222"].synthetic is (manifest.get("synthetic") is True)


def test_a_damaged_manifest_or_current_is_reported_not_raised(local_published,
                                                              local_store: LocalStore) -> None:
    add_version(local_store, "333333333333")
    local_store.put_bytes(f"datasets/{DATASET}/333333333333/manifest.json", b"[]")
    local_store.put_bytes(f"datasets/{DATASET}/CURRENT", b'{"version": "999999999999"}')
    [listed] = inventory.list_datasets(local_store)
    assert listed.current == "999999999999"
    assert "names version 999999999999, which is not on the store" in listed.problem
    versions = {v.version: v for v in listed.versions}
    assert versions["333333333333"].problem == (
        f"{local_store.root}/datasets/{DATASET}/333333333333/manifest.json: field (document): "
        "Input should be an object")
    assert versions[local_published.version].counts["test"] == 8


def test_an_unknown_dataset(local_published, local_store: LocalStore) -> None:
    with pytest.raises(DatasetNotFound, match=f"dataset 'roses' is not on {local_store.uri}"):
        inventory.describe_dataset(local_store, "roses")
    assert inventory.list_datasets(LocalStore(local_store.root / "empty")) == []


@pytest.mark.slow  # a fresh interpreter
def test_listing_never_imports_torch(registered_copy: StoreAndCache) -> None:
    store, _ = registered_copy
    program = (
        "import sys\n"
        "from flowerml.cli import main\n"
        f"for args in (['runs', 'list'], ['runs', 'show', 'tiny'], ['datasets', 'list'],\n"
        f"             ['datasets', 'show', 'flowers102']):\n"
        f"    try:\n"
        f"        main([*args, '--store', {str(store.root)!r}, '--json'])\n"
        f"    except SystemExit as stop:\n"
        f"        assert not stop.code, stop.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 4


def test_runs_and_datasets_on_s3(registered_run: RegisteredRun, s3_store) -> None:
    """The same inventory on an S3 store: s3:// locations, a run deleted to the last key."""
    from tests.helpers.synthetic import publish_copy

    published = publish_copy(registered_run.store.root, s3_store)
    [dataset] = inventory.list_datasets(s3_store)
    assert dataset.current == published.version
    assert dataset.versions[0].location == (
        f"{s3_store.uri}/datasets/{DATASET}/{published.version}/")
    assert dataset.location.startswith("s3://")
    [run] = inventory.list_runs(s3_store)
    assert (run.run_id, run.status, run.registered) == (TINY_RUN, "finished",
                                                         ["flowers102:000001"])
    assert run.location == f"{s3_store.uri}/runs/{TINY_RUN}/"
    inventory.delete_run(s3_store, TINY_RUN, force=True)
    assert inventory.list_runs(s3_store) == []
