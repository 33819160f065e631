"""Our registry mirrored to a real MLflow Model Registry (flowerml/tracking/registry_mirror.py,
flowerml/registry/mlflow_sync.py, `flowerml registry sync-mlflow`): each version an MLflow model
version (weights and card as artifacts, the card as description, sha256 and flowerml version as
tags), the ONNX export once there is one, aliases following every move (a rollback included),
a race of two promotions ending at the winner, and a mirror that is down never blocking a move.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from flowerml.cli.tracking import mirror_registry
from flowerml.io.storage_local import LocalStore
from flowerml.registry.mlflow_sync import sync_model
from flowerml.registry.release import render_card
from flowerml.registry.versions import Registry
from flowerml.settings import load_settings
from flowerml.tracking.registry_mirror import ModelMirror
from flowerml.tracking.server import TrackingServer
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.mlflow_servers import MlflowServer
from tests.helpers.network import free_port

pytestmark = pytest.mark.slow

ALIAS = "production"


def card(top1: float) -> dict:
    return {"arch": "resnet18", "metrics": {"top1": top1}, "software": {"flowerml": "0.1.0"},
            "run_id": f"run-{top1}"}


@pytest.fixture
def model_name(request: pytest.FixtureRequest, mlflow_client) -> str:
    """A model name of this test's own on the shared server (any earlier mirror of it gone)."""
    from mlflow.exceptions import MlflowException

    name = f"mirror-{request.node.name.removeprefix('test_')[:40].replace('_', '-')}"
    with contextlib.suppress(MlflowException):
        mlflow_client.delete_registered_model(name)
    return name


@pytest.fixture
def registry(tmp_path: Path, model_name: str) -> Registry:
    """Three committed versions of `model_name` (tiny safetensors weights)."""
    entry = Registry(LocalStore(tmp_path / "store"), model_name)
    for top1 in (0.7, 0.8, 0.9):
        entry.register(save({"w": torch.full((2,), top1)}), card(top1), render=render_card)
    return entry


def mlflow_env(url: str) -> dict[str, str]:
    return {"FLOWERML_MLFLOW_URI": url}


def mlflow_alias(client, name: str, alias: str) -> int:
    """The flowerml version MLflow's alias points at."""
    return int(client.get_model_version_by_alias(name, alias).tags["flowerml.version"])


def test_sync_mirrors_each_version_with_its_files_card_and_tags(
        registry: Registry, mlflow_tracking: MlflowServer, mlflow_client,
        tmp_path: Path) -> None:
    name = registry.model
    result = invoke("registry", "sync-mlflow", name, "--json", env=mlflow_env(mlflow_tracking.url),
                    store=registry.store)
    assert result.exit_code == 0, result.output
    versions = sorted(mlflow_client.search_model_versions(f"name = '{name}'"),
                      key=lambda v: int(v.version))
    assert [v.tags["flowerml.version"] for v in versions] == ["1", "2", "3"]
    for mirrored, ours in zip(versions, registry.versions(), strict=True):
        assert mirrored.tags["flowerml.sha256"] == ours.weights_sha256
        assert mirrored.tags["flowerml.flowerml_version"] == "0.1.0"
        assert mirrored.description == registry.store.get_bytes(
            registry.attachment_key(ours.version, "card.md")).decode()
        files = {a.path for a in mlflow_client.list_artifacts(mirrored.run_id, "model")}
        assert {"model/model.safetensors", "model/card.json", "model/card.md"} <= files
    weights = mlflow_client.download_artifacts(versions[0].run_id, "model/model.safetensors",
                                               str(tmp_path))
    assert Path(weights).read_bytes() == registry.store.get_bytes(
        registry.attachment_key(1, "model.safetensors"))

    again = invoke("registry", "sync-mlflow", name, "--json",
                   env=mlflow_env(mlflow_tracking.url), store=registry.store)
    assert again.exit_code == 0, again.output
    assert '"created": {}' in again.stdout
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == 3


def test_alias_moves_and_a_rollback_are_mirrored(registry: Registry,
                                                 mlflow_tracking: MlflowServer,
                                                 mlflow_client) -> None:
    settings = load_settings(mlflow_uri=mlflow_tracking.url)
    for version in (1, 3):
        registry.set_alias(ALIAS, version, reason="test")
        mirror_registry(settings, registry.store, registry.model)
        assert mlflow_alias(mlflow_client, registry.model, ALIAS) == version
    result = invoke("registry", "rollback", registry.model, env=mlflow_env(mlflow_tracking.url),
                    store=registry.store)
    assert result.exit_code == 0, result.output
    assert registry.alias(ALIAS).version == 1
    assert mlflow_alias(mlflow_client, registry.model, ALIAS) == 1


def test_a_stale_mirror_write_is_corrected_so_mlflow_ends_at_the_winner(
        registry: Registry, mlflow_tracking: MlflowServer, mlflow_client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotion A (to 2) wins first, promotion B (to 3) second; B's mirror runs to its end
    between A's reading our alias and A's MLflow write: A's write is stale, and A's sync reads
    ours again and puts MLflow back at the winner."""
    server = TrackingServer(mlflow_tracking.url)
    sync_model(server, registry.store, registry.model)  # the versions, once
    set_alias = ModelMirror.set_alias
    interleaved = []

    def b_promotes_first(self, alias: str, number: int) -> None:
        if not interleaved:
            interleaved.append(number)
            registry.set_alias(ALIAS, 3, reason="promotion B")
            monkeypatch.setattr(ModelMirror, "set_alias", set_alias)
            sync_model(server, registry.store, registry.model)
            assert mlflow_alias(mlflow_client, registry.model, ALIAS) == 3
        set_alias(self, alias, number)  # A's stale write

    registry.set_alias(ALIAS, 2, reason="promotion A")
    monkeypatch.setattr(ModelMirror, "set_alias", b_promotes_first)
    sync_model(server, registry.store, registry.model)
    assert interleaved and registry.alias(ALIAS).version == 3
    assert mlflow_alias(mlflow_client, registry.model, ALIAS) == 3


def test_two_promotions_racing_leave_mlflow_at_ours(registry: Registry,
                                                    mlflow_tracking: MlflowServer,
                                                    mlflow_client) -> None:
    settings = load_settings(mlflow_uri=mlflow_tracking.url)
    mirror_registry(settings, registry.store, registry.model)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        try:
            start.wait()
            Registry(registry.store, registry.model).set_alias(ALIAS, version,
                                                               reason=f"race {version}")
            mirror_registry(settings, registry.store, registry.model)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    winner = registry.alias(ALIAS)
    assert winner.seq == 2 and winner.version in (2, 3)
    assert mlflow_alias(mlflow_client, registry.model, ALIAS) == winner.version


def test_a_mirror_that_is_down_never_blocks_a_move_and_sync_brings_it_level(
        registry: Registry, mlflow_tracking: MlflowServer, mlflow_client) -> None:
    registry.set_alias(ALIAS, 3, reason="test")
    registry.set_alias(ALIAS, 2, reason="test")
    down = f"http://127.0.0.1:{free_port()}"
    result = invoke("registry", "rollback", registry.model, env=mlflow_env(down),
                    store=registry.store)
    assert result.exit_code == 0, result.output
    assert registry.alias(ALIAS).version == 3
    assert result.stderr == (f"flowerml: warning: MLflow registry at {down} is behind for "
                             f"{registry.model} (connection refused): run flowerml registry "
                             f"sync-mlflow {registry.model}\n")
    synced = invoke("registry", "sync-mlflow", registry.model,
                    env=mlflow_env(mlflow_tracking.url), store=registry.store)
    assert synced.exit_code == 0, synced.output
    assert synced.stdout == (f"MLflow model {registry.model} at {mlflow_tracking.url}: 000001 "
                             "as MLflow version 1, 000002 as MLflow version 2, 000003 as MLflow "
                             "version 3; production -> 000003\n")
    assert mlflow_alias(mlflow_client, registry.model, ALIAS) == 3


def test_sync_needs_a_tracking_server(registry: Registry) -> None:
    assert_refused(invoke("registry", "sync-mlflow", registry.model, store=registry.store),
                   "flowerml: error: no MLflow server to sync with: set FLOWERML_MLFLOW_URI "
                   "(or MLFLOW_TRACKING_URI)")
    down = f"http://127.0.0.1:{free_port()}"
    assert_refused(invoke("registry", "sync-mlflow", registry.model, env=mlflow_env(down),
                          store=registry.store),
                   f"flowerml: error: MLflow tracking server {down} is unreachable")


def test_an_onnx_export_is_added_to_its_mirrored_version(
        registered_run, mlflow_tracking: MlflowServer, mlflow_client, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered tiny run, exported after it was mirrored (its graph made once a session,
    tests/helpers/registries.py): the next sync adds model.onnx."""
    from flowerml.serving.export import export_version
    from tests.helpers.registries import exports_made_once, registry_copy, session_folder

    exports_made_once(monkeypatch, session_folder(tmp_path_factory.getbasetemp()))

    entry, cache = registry_copy(registered_run, tmp_path / "copy")
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        mlflow_client.delete_registered_model(entry.model)
    server = TrackingServer(mlflow_tracking.url)
    assert sync_model(server, entry.store, entry.model).onnx_added == []
    export_version(entry, 1, cache_dir=cache, workers=0)
    assert sync_model(server, entry.store, entry.model).onnx_added == [1]
    [mirrored] = mlflow_client.search_model_versions(f"name = '{entry.model}'")
    files = {a.path for a in mlflow_client.list_artifacts(mirrored.run_id, "model")}
    assert "model/model.onnx" in files
    assert len(mirrored.tags["flowerml.onnx_sha256"]) == 64
    assert mlflow_alias(mlflow_client, entry.model, "production") == 1


def test_a_distilled_student_is_tracked_and_its_promotion_mirrored(
        registered_run, model_name: str, mlflow_tracking: MlflowServer, mlflow_client,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flowerml distill --promote`: the student's run is an MLflow run, and its release (a new
    model's version, moved to production by the student gate) is mirrored. The student is a
    MobileNetV3-Small (as distillation is used: smaller than its ResNet-18 teacher), and the
    release times each model for 0.05 s, not 1 s (its figures are test_distill.py's point)."""
    import functools

    from flowerml.distillation import distill as distillation
    from tests.helpers.registries import registry_copy

    monkeypatch.setattr(distillation, "release_student",
                        functools.partial(distillation.release_student, speed_seconds=0.05))
    entry, cache = registry_copy(registered_run, tmp_path / "copy")
    result = invoke("distill", "--teacher", "flowers102@production", "--student",
                    "mobilenet_v3_small",
                    "--weights", "none", "--epochs", "1", "--batch-size", "4", "--device",
                    "cpu", "--workers", "0", "--run-id", "student", "--promote", "--threshold",
                    "0", "--max-gap", "1", "--model", model_name, "--json",
                    env=mlflow_env(mlflow_tracking.url), store=entry.store, cache=cache)
    assert result.exit_code == 0, result.output
    experiment = mlflow_client.get_experiment_by_name("flowerml/flowers102")
    [run] = mlflow_client.search_runs([experiment.experiment_id],
                                      filter_string="tags.`flowerml.run_id` = 'student'")
    assert run.data.tags["flowerml.objective"] == "distillation"
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "valid_top1")] \
        == [1]
    assert Registry(entry.store, model_name).alias(ALIAS).version == 1
    assert mlflow_alias(mlflow_client, model_name, ALIAS) == 1


def test_another_store_s_model_of_the_same_name_is_refused_not_overwritten(
        registry: Registry, mlflow_tracking: MlflowServer, mlflow_client,
        tmp_path: Path) -> None:
    assert invoke("registry", "sync-mlflow", registry.model,
                  env=mlflow_env(mlflow_tracking.url), store=registry.store).exit_code == 0
    other = Registry(LocalStore(tmp_path / "other-store"), registry.model)
    other.register(save({"w": torch.zeros(3)}), card(0.5), render=render_card)
    result = invoke("registry", "sync-mlflow", registry.model,
                    env=mlflow_env(mlflow_tracking.url), store=other.store)
    mlflow_sha = registry.get(1).weights_sha256
    assert_refused(result, f"flowerml: error: MLflow model {registry.model} at "
                           f"{mlflow_tracking.url}: its version 1 mirrors {registry.model}:000001 "
                           f"with other weights (sha256 {mlflow_sha[:12]}..., ours "
                           f"{other.get(1).weights_sha256[:12]}...): another store's registry "
                           f"uses the name {registry.model} on this server; nothing was changed "
                           "in MLflow")
    versions = mlflow_client.search_model_versions(f"name = '{registry.model}'")
    assert sorted(v.tags["flowerml.sha256"] for v in versions) == sorted(
        entry.weights_sha256 for entry in registry.versions())
