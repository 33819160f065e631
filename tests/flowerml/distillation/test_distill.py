"""flowerml.distillation.distill and its parts (teacher, distillation_task, agreement, model_cost): the
loss, the teacher (frozen, seeing the student's very view), a distillation run and its resume,
the student gate, what a student costs, and its release.

The teacher is the session's registered tiny ResNet-18 (`registered_run`: flowers102:1,
production); each module works on its own copy of that store. The students are
MobileNetV3-Small (what a student is for, and ~3x cheaper steps than a ResNet-18)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowerml.core.recipes import DistillConfig, build_config
from flowerml.distillation import distill as distillation
from flowerml.distillation.distillation_task import (
    DistillationTask,
    Mix,
    distillation_loss,
    mix_batch,
)
from flowerml.distillation.model_cost import count_macs
from flowerml.distillation.teacher import DistillError, load_recorded_teacher, load_teacher
from flowerml.registry.gates import GateError, StudentGate
from flowerml.registry.names import RegistryNotFound
from flowerml.registry.promotion import promote_student_version
from flowerml.registry.versions import Registry
from flowerml.training.fit import fit
from flowerml.training.runs import RunError, RunFiles
from tests.helpers.cli import invoke
from tests.helpers.forked_commands import TORCHRUN_VARIABLES
from tests.helpers.interrupts import (
    DiedBeforeCheckpoint,
    die_before_checkpoint,
    kill_at_first_checkpoint,
)
from tests.helpers.stores import StoreAndCache, copy_tree
from tests.helpers.synthetic import DATASET, RegisteredRun

EPOCHS = 2
TEACHER = "flowers102@production"


def student_config(**overrides):
    values = {"arch": "mobilenet_v3_small", "weights": "none", "epochs": EPOCHS, "batch_size": 4,
              "image_size": 40, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0.0,
              "patience": 0, "label_smoothing": 0.0}
    return build_config("default", **{**values, **overrides})


SETTINGS = DistillConfig(temperature=3.0, alpha=0.7, mixup=0.5)


def copy_store(registered_run: RegisteredRun, dest: Path) -> StoreAndCache:
    from flowerml.io.storage_local import LocalStore

    copy_tree(registered_run.store.root, dest / "store")
    copy_tree(registered_run.cache, dest / "cache")
    return StoreAndCache(LocalStore(dest / "store", concurrency=8), dest / "cache")


@pytest.fixture(scope="module")
def teacher_store(registered_run: RegisteredRun,
                  tmp_path_factory: pytest.TempPathFactory) -> StoreAndCache:
    """The module's own copy of the store holding the teacher flowers102:1 and its data."""
    return copy_store(registered_run, tmp_path_factory.mktemp("distill"))


def run_distill(teacher_store: StoreAndCache, run_id: str, *, on_event=None, **overrides):
    store, cache = teacher_store
    teacher = load_teacher(store, ref=TEACHER)
    return distillation.distill(student_config(**overrides), SETTINGS, teacher, store=store,
                                dataset=DATASET, run_id=run_id, cache_dir=cache, device="cpu",
                                workers=0, on_event=on_event)


@pytest.fixture(scope="module")
def straight(teacher_store: StoreAndCache) -> distillation.DistillResult:
    """Student run 'straight': distilled in one go (the reference of the resume tests)."""
    return run_distill(teacher_store, "straight")


# --------------------------------------------------------------------------------------------
# The loss


def manual_loss(student, teacher, targets, temperature, alpha):
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_student = torch.log_softmax(student / temperature, dim=1)
    kl = (p_teacher * (torch.log(p_teacher) - log_student)).sum(dim=1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(student, targets)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (10.0, 0.3)])
def test_the_loss_is_the_tempered_kl_plus_the_labels_cross_entropy(temperature: float,
                                                                    alpha: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 5, generator=generator)
    targets = torch.tensor([0, 4, 2, 1, 3, 0])
    ours = distillation_loss(student, teacher, targets, temperature=temperature, alpha=alpha)
    assert ours.item() == pytest.approx(manual_loss(student, teacher, targets, temperature,
                                                    alpha).item(), rel=1e-5)


def test_the_loss_at_its_ends() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 8, 4, generator=generator)
    targets = torch.arange(8) % 4
    # alpha 0: the labels alone; alpha 1: the teacher alone, zero when the student matches it.
    assert distillation_loss(student, teacher, targets, temperature=4, alpha=0).item() == \
        pytest.approx(F.cross_entropy(student, targets).item())
    assert distillation_loss(teacher, teacher, targets, temperature=4, alpha=1).item() == \
        pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student, teacher, targets, temperature=4, alpha=1).item() > 0


def test_t_squared_keeps_the_soft_gradients_on_one_scale() -> None:
    """Without T^2 the soft term's gradients shrink as 1/T^2 (Hinton et al.); with it they
    tend to a constant: the same alpha means the same balance whatever T."""
    generator = torch.Generator().manual_seed(2)
    base, teacher = torch.randn(2, 16, 10, generator=generator)
    targets = torch.zeros(16, dtype=torch.long)

    def gradient_norm(temperature: float) -> float:
        student = base.clone().requires_grad_(True)
        distillation_loss(student, teacher, targets, temperature=temperature,
                          alpha=1.0).backward()
        return student.grad.norm().item()

    high, higher = gradient_norm(20.0), gradient_norm(40.0)
    assert high == pytest.approx(higher, rel=0.01)
    # Exactly (softmax(s) - softmax(t)) * T / B... in the limit: (s - t) / (K B).
    limit = ((base - base.mean(1, keepdim=True)) - (teacher - teacher.mean(1, keepdim=True))
             ).norm().item() / (10 * 16)
    assert higher == pytest.approx(limit, rel=0.02)


def test_mixup_mixes_the_labels_with_the_images_weight() -> None:
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 3, generator=generator)
    targets = torch.tensor([0, 1, 2, 0])
    partner = torch.tensor([2, 3, 0, 1])
    mixed = distillation_loss(student, teacher, targets, temperature=2, alpha=0,
                              mix=Mix(0.25, partner))
    expected = 0.25 * F.cross_entropy(student, targets) + 0.75 * F.cross_entropy(
        student, targets[partner])
    assert mixed.item() == pytest.approx(expected.item())


def test_mix_batch() -> None:
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    same, mix = mix_batch(images, 0.0)
    assert same is images and mix is None
    assert torch.equal(torch.get_rng_state(), before)  # probability 0 draws nothing
    mixed, mix = mix_batch(images, 1.0)
    assert mix is not None and 0 <= mix.weight <= 1
    assert sorted(mix.partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, mix.weight * images + (1 - mix.weight) * images[mix.partner])
    torch.manual_seed(0)
    again, mix_again = mix_batch(images, 1.0)
    assert torch.equal(again, mixed) and mix_again.weight == mix.weight  # seeded: repeatable


# --------------------------------------------------------------------------------------------
# The teacher and a distillation run


class RecordingDistillation(DistillationTask):
    """Distillation that records, for every training step, what the student and the teacher
    were fed and the raw batch before mixup."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def compute(self, model, inputs, targets):
        fed: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_pre_hook(
            lambda _module, args, name=name: fed.setdefault(name, args[0].detach().clone()))
            for name, module in (("student", model), ("teacher", self.teacher.model))]
        try:
            return super().compute(model, inputs, targets)
        finally:
            for hook in hooks:
                hook.remove()
            self.steps.append((inputs.detach().clone(), fed["student"], fed["teacher"]))


@pytest.mark.slow  # trains a student
def test_teacher_and_student_see_the_same_view_and_the_teacher_stays_frozen(
        teacher_store: StoreAndCache) -> None:
    store, cache = teacher_store
    teacher = load_teacher(store, ref=TEACHER)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    task = RecordingDistillation(teacher, DistillConfig(mixup=1.0))
    result = fit(student_config(epochs=1), store=store, dataset=DATASET, run_id="same-view",
                 cache_dir=cache, device="cpu", workers=0, task=task)
    assert len(task.steps) == math.ceil(12 / 4)  # 12 train images, batch 4
    for raw, student, teacher_view in task.steps:
        assert torch.equal(student, teacher_view)  # one view, computed once per step
        assert not torch.equal(student, raw)  # mixup 1.0: every batch is mixed
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # BN stats too
    assert result.epochs_run == 1


@pytest.mark.slow  # trains a student (`straight`)
def test_a_distilled_run_records_its_teacher_and_agreement(teacher_store: StoreAndCache,
                                                           straight) -> None:
    store, _ = teacher_store
    record = RunFiles(store, "straight").read_json("config.json")
    version = Registry(store, DATASET).get(1)
    assert record["objective"] == {
        "kind": "distillation", "description": "distillation from flowers102:000001",
        "temperature": 3.0, "alpha": 0.7, "mixup": 0.5,
        "teacher": {"source": "registry", "name": DATASET, "version": 1,
                    "sha256": version.weights_sha256, "label": "flowers102:000001"}}
    history = [json.loads(line) for line in store.get_bytes("runs/straight/metrics.jsonl")
               .splitlines()]
    assert len(history) == EPOCHS and all(0 <= row["valid_agreement"] <= 1 for row in history)
    best = next(row for row in history if row["epoch"] == straight.fit.best_epoch)
    assert straight.agreement_valid == best["valid_agreement"]
    assert straight.to_json()["teacher"]["sha256"] == version.weights_sha256


def assert_same_run(store, run_id: str, reference: str) -> None:
    """Bit for bit the same weights (last epoch's and best) and the same metrics per epoch."""
    for load in (lambda run: run.load_checkpoint()["model"], lambda run: run.load_weights()[0]):
        ours, theirs = load(RunFiles(store, run_id)), load(RunFiles(store, reference))
        assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []

    def metrics(run: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items()
                 if k not in ("seconds", "images_per_second")}
                for line in store.get_bytes(f"runs/{run}/metrics.jsonl").splitlines()]

    assert metrics(run_id) == metrics(reference)


@pytest.mark.slow  # trains a student, twice
def test_an_interrupted_distillation_resumes_bit_for_bit(teacher_store: StoreAndCache,
                                                         straight,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = teacher_store
    die_before_checkpoint(monkeypatch, epoch=2)
    with pytest.raises(DiedBeforeCheckpoint):
        run_distill(teacher_store, "interrupted")
    assert RunFiles(store, "interrupted").read_json("checkpoint.json")["epoch"] == 1
    monkeypatch.undo()
    resumed = run_distill(teacher_store, "interrupted")
    assert resumed.fit.resumed_from_epoch == 1 and resumed.fit.epochs_run == EPOCHS
    assert resumed.agreement_valid == straight.agreement_valid
    assert_same_run(store, "interrupted", "straight")


@pytest.mark.slow  # a child process: a distillation killed with SIGKILL
def test_resume_after_sigkill_matches_an_uninterrupted_run(teacher_store: StoreAndCache,
                                                           straight, tmp_path: Path) -> None:
    """The kill needs a real process (`python -m flowerml.cli`); the
    same `flowerml distill` resumes it in-process."""
    store, cache = teacher_store
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache)}
    args = ["distill", "--teacher", TEACHER, "--config", json.dumps(student_config().to_json()),
            "--temperature", "3", "--alpha", "0.7", "--mixup", "0.5", "--device", "cpu",
            "--workers", "0", "--run-id", "killed", "--json"]
    killed_at = kill_at_first_checkpoint(args, env, store.root / "runs" / "killed",
                                         tmp_path / "child")
    assert 1 <= killed_at < EPOCHS
    resumed = invoke(*args, store=store, cache=cache)
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    assert result["resumed_from_epoch"] == killed_at and result["epochs_run"] == EPOCHS
    assert result["agreement_valid"] == straight.agreement_valid
    assert_same_run(store, "killed", "straight")


@pytest.mark.slow  # two distillation processes (gloo on the CPU)
def test_ddp_with_two_gloo_processes(teacher_store: StoreAndCache) -> None:
    """torchrun starts two distillation ranks (a child forked from this process could not run
    autograd once this process's autograd threads had started)."""
    store, cache = teacher_store
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    env.update({"FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache),
                "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "flowerml.cli", "distill", "--teacher", TEACHER,
               "--student", "mobilenet_v3_small", "--weights", "none", "--epochs", "1",
               "--batch-size", "4", "--mixup", "0.5", "--device", "cpu", "--workers", "0",
               "--run-id", "ddp", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 speaks for the run
    assert results[0]["world_size"] == 2 and 0 <= results[0]["agreement_valid"] <= 1
    assert RunFiles(store, "ddp").read_json("config.json")["objective"]["teacher"]["version"] == 1


@pytest.mark.slow  # trains a student (`straight`)
def test_a_run_resumes_only_with_its_own_objective(teacher_store: StoreAndCache,
                                                   straight) -> None:
    store, cache = teacher_store
    assert "objective" not in RunFiles(store, "tiny").read_json("config.json")  # flowerml train
    with pytest.raises(RunError, match="was trained with distillation from flowers102:000001, "
                                       "not cross-entropy on the labels"):
        fit(student_config(), store=store, dataset=DATASET, run_id="straight", cache_dir=cache,
            device="cpu", workers=0)
    other = DistillationTask(load_teacher(store, ref=TEACHER), DistillConfig(temperature=1.0))
    with pytest.raises(RunError, match="a trained run resumes only as itself"):
        fit(student_config(), store=store, dataset=DATASET, run_id="straight", cache_dir=cache,
            device="cpu", workers=0, task=other)


def test_a_linear_probe_cannot_be_distilled_and_nothing_is_written(
        teacher_store: StoreAndCache) -> None:
    with pytest.raises(DistillError, match="--strategy linear-probe trains on cached features"):
        run_distill(teacher_store, "probe", strategy="linear-probe")
    assert not RunFiles(teacher_store.store, "probe").exists()


# --------------------------------------------------------------------------------------------
# Loading the teacher


def test_the_teacher_is_loaded_verified_frozen_and_by_version(teacher_store: StoreAndCache
                                                              ) -> None:
    store, _ = teacher_store
    by_alias = load_teacher(store, ref=TEACHER)
    by_version = load_teacher(store, ref="flowers102:1")
    assert by_alias.identity == by_version.identity  # an alias is recorded as its version
    assert not by_alias.model.training
    assert all(not p.requires_grad for p in by_alias.model.parameters())
    by_run = load_teacher(store, run_id="tiny")
    assert by_run.identity == {"source": "run", "run_id": "tiny", "label": "run tiny",
                               "sha256": by_alias.identity["sha256"]}
    assert by_run.file_bytes == by_alias.file_bytes > 0


def test_unknown_teachers_are_refused(teacher_store: StoreAndCache) -> None:
    store, _ = teacher_store
    with pytest.raises(DistillError, match="give the teacher as --teacher"):
        load_teacher(store)
    with pytest.raises(RegistryNotFound, match=r"--teacher flowers102@nope: flowers102 has no "
                                               r"alias 'nope'") as info:
        load_teacher(store, ref="flowers102@nope")
    assert info.value.kind == "not-found"
    with pytest.raises(DistillError, match="--teacher-run missing: no such run"):
        load_teacher(store, run_id="missing")


def test_a_teacher_whose_weights_changed_is_refused(teacher_store: StoreAndCache) -> None:
    store, _ = teacher_store
    identity = load_teacher(store, ref=TEACHER).identity
    with pytest.raises(DistillError, match="no longer holds the weights this run was distilled"):
        load_recorded_teacher(store, {**identity, "sha256": "0" * 64})


# --------------------------------------------------------------------------------------------
# What a model costs, and releasing a student


def test_macs_are_counted_without_computing() -> None:
    # The published figures: ResNet-152 11.5 GMACs, ResNet-18 1.8, MobileNetV3-Large 0.22.
    assert count_macs("resnet152", 1000, 224) == pytest.approx(11.5e9, rel=0.01)
    assert count_macs("resnet18", 1000, 224) == pytest.approx(1.82e9, rel=0.01)
    assert count_macs("mobilenet_v3_large", 1000, 224) == pytest.approx(
        0.217e9, rel=0.02)


@pytest.mark.slow  # trains a student (`straight`)
def test_release_registers_the_student_under_its_own_name_with_its_teacher(
        registered_run: RegisteredRun, teacher_store: StoreAndCache, straight,
        tmp_path: Path) -> None:
    """The module's distilled run 'straight', released as 'student' from a store of the
    test's own (the release registers and promotes a second model there)."""
    store, cache = copy_store(registered_run, tmp_path)
    copy_tree(teacher_store.store.root / "runs" / "straight", store.root / "runs" / "student")
    strict = distillation.release_student(
        store, "student", cache_dir=cache, gate=StudentGate(threshold=1.0, max_gap=1.0),
        promote=True, device="cpu", workers=0, speed_seconds=0.05)
    assert strict.model == "flowers102-small" and strict.version == 1
    assert not strict.passes and not strict.promoted
    assert Registry(store, "flowers102-small").alias("production") is None
    card = Registry(store, "flowers102-small").get(1).card
    teacher_card = Registry(store, DATASET).get(1).card
    # The teacher's top-1 is measured on the student's own test manifest: the card's figure.
    assert card["teacher"]["test_top1"] == pytest.approx(teacher_card["metrics"]["top1"])
    assert card["teacher"]["label"] == "flowers102:000001" and card["teacher"]["version"] == 1
    assert card["lineage"]["run_id"] == "student"
    assert card["gate"] == {"kind": "student", "threshold": 1.0, "max_gap": 1.0,
                            "force": False, "promote": False, "reasons": strict.reasons}
    # A MobileNetV3-Small student of a ResNet-18 teacher, both with 4 classes.
    for side, params, file_bytes in (("student", 1_521_956, 5e6), ("teacher", 11_178_564, 40e6)):
        profile = card["efficiency"][side]
        assert profile["params"] == params
        assert profile["macs"] > 0 and profile["file_bytes"] > file_bytes
        assert profile["cpu_images_per_second"] > 0
    assert card["efficiency"]["params_ratio"] == round(11_178_564 / 1_521_956, 2)
    assert 0 <= card["distillation"]["agreement_test"] <= 1
    assert card["distillation"]["temperature"] == SETTINGS.temperature

    # Later, by hand (`registry promote`): the same gate on the card's figures; force records.
    small = Registry(store, "flowers102-small")
    promoted, reasons, _ = promote_student_version(
        small, 1, alias="production", gate=StudentGate(threshold=1.0, max_gap=1.0))
    assert not promoted and reasons == strict.reasons and small.alias("production") is None
    promoted, reasons, state = promote_student_version(
        small, 1, alias="production", gate=StudentGate(threshold=1.0, max_gap=1.0), force=True)
    assert promoted and state.version == 1 and reasons[-1] == "forced past the student gate"
    assert small.history("production")[-1]["forced"] is True
    with pytest.raises(GateError, match="flowers102:000001 was not released as a student"):
        promote_student_version(Registry(store, DATASET), 1, alias="production",
                                gate=StudentGate())

    again = distillation.release_student(
        store, "student", cache_dir=cache, gate=StudentGate(threshold=0.0, max_gap=1.0),
        promote=True, device="cpu", workers=0, speed_seconds=0.05)
    assert again.version == 1 and again.passes and again.promoted  # the same version reused
    assert Registry(store, "flowers102-small").alias("production").version == 1
    assert len(Registry(store, "flowers102-small").versions()) == 1


def test_a_student_sees_the_pixels_its_teacher_was_trained_on() -> None:
    """The teacher scores the student's very batch, so a new student run is decoded and
    normalised by the teacher's recorded preprocessing (scaled to another student size)."""
    from types import SimpleNamespace

    from flowerml.data.preprocessing import Preprocessing
    from flowerml.distillation.teacher import Teacher

    resnet152_v2 = Preprocessing(232, 224, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    teacher = Teacher(SimpleNamespace(preprocessing=resnet152_v2), {"label": "t"}, 0)
    task = DistillationTask(teacher, DistillConfig())
    assert task.preprocessing(build_config("default", image_size=224)) == resnet152_v2
    smaller = task.preprocessing(build_config("default", image_size=112))
    assert (smaller.resize, smaller.crop, smaller.mean) == (116, 112, resnet152_v2.mean)
