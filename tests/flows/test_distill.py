"""The distill stage under Prefect's harness: `distill-flowers` against the current champion
(the session's registered tiny ResNet-18), and the retrain flow's optional `distill` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from flows.distill import DistillParams, StudentParams, distill_flowers
from flows.retrain import RetrainParams
from tests.helpers.stores import copy_tree
from tests.helpers.synthetic import RegisteredRun

# A student smaller than its ResNet-18 teacher, as distillation is used (and ~3x cheaper a step).
STUDENT = {"student": "mobilenet_v3_small", "epochs": 1, "weights": "none",
           "gate": {"threshold": 0.0, "max_gap": 1.0}}
RUNNER = {"device": "cpu", "workers": 0, "timeout_s": 600}


def test_the_student_trains_like_its_teacher_with_its_own_arch_epochs_and_weights() -> None:
    teacher = {"arch": "resnet152", "weights": "imagenet", "epochs": 30, "warmup_epochs": 2.0,
               "image_size": 224, "batch_size": 48, "freeze_stages": 3}
    config = StudentParams(student="efficientnet_b0", epochs=1).config(teacher)
    assert (config.arch, config.epochs, config.warmup_epochs) == ("efficientnet_b0", 1, 1.0)
    assert (config.image_size, config.batch_size, config.weights) == (224, 48, "imagenet")
    assert config.freeze_stages == 0  # a student trains every stage
    assert StudentParams(weights="none").config(teacher).weights == "none"


def test_the_retrain_flow_has_the_stage_off_by_default() -> None:
    assert RetrainParams().distill.enabled is False
    stage = RetrainParams.model_validate({"distill": {"enabled": True, **STUDENT}}).distill
    assert stage.enabled and stage.student == "mobilenet_v3_small" and stage.gate.max_gap == 1.0
    with pytest.raises(ValidationError, match="alpha"):
        RetrainParams.model_validate({"distill": {"distillation": {"alpha": 2}}})


@pytest.mark.timeout(600)  # one epoch in a child process, then evaluation and release
def test_distill_manual_releases_a_student_of_the_champion(
        prefect_harness: None, registered_run: RegisteredRun, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    copy_tree(registered_run.store.root, tmp_path / "store")
    copy_tree(registered_run.cache, tmp_path / "cache")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "store")

    summary = distill_flowers(DistillParams(teacher="flowers102@production",
                                            store=str(store.root), student=STUDENT,
                                            runner=RUNNER))
    assert summary["promoted"] and summary["label"] == "flowers102-small:000001"
    assert summary["teacher"]["label"] == "flowers102:000001"  # the alias, resolved once
    assert 0 <= summary["agreement"] <= 1 and 0 <= summary["agreement_valid"] <= 1
    assert Registry(store, "flowers102-small").alias("production").version == 1
    record = json.loads((store.root / "runs" / summary["run_id"] / "config.json").read_text())
    teacher_config = Registry(store, "flowers102").get(1).card["lineage"]["training_config"]
    assert record["config"] == {**teacher_config, "arch": "mobilenet_v3_small", "epochs": 1,
                                "warmup_epochs": min(teacher_config["warmup_epochs"], 1)}
    assert record["objective"]["teacher"]["version"] == 1
    card = Registry(store, "flowers102-small").get(1).card
    assert card["teacher"]["label"] == "flowers102:000001"
    efficiency = card["efficiency"]
    assert efficiency["teacher"]["macs"] > efficiency["student"]["macs"] > 0
    assert efficiency["macs_ratio"] == round(efficiency["teacher"]["macs"] /
                                             efficiency["student"]["macs"], 2)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a retrain run, then its student (test_retrain.py's story has the
# rejected run whose distill stage is skipped)
def test_the_retrain_flow_distils_the_model_it_promoted(
        prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive
    from flows.retrain import retrain_flowers

    write_synthetic_archive(tmp_path / "src", SyntheticSpec(classes=4, per_class=12,
                                                            image_size=56, seed=4))
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "store")

    first = retrain_flowers(RetrainParams(
        source=str(tmp_path / "src"), store=str(store.root), export_onnx=False,
        training={"recipe": "demo", "epochs": 1, "image_size": 40, "batch_size": 8,
                  "device": "cpu", "workers": 0},
        gate={"threshold": 0.0, "tolerance": 1.0}, distill={"enabled": True, **STUDENT}))
    assert first["promoted"] and first["distill"]["promoted"]
    assert first["distill"]["run_id"] == f"{first['run_id']}-student"
    assert first["distill"]["teacher"]["label"] == "flowers102:000001"
    assert Registry(store, "flowers102-small").alias("production").version == 1
    assert len(Registry(store, "flowers102-small").versions()) == 1
