"""Knowledge distillation: a small student trained on a frozen teacher's outputs, and its release.

This module owns:
- the teacher (`load_teacher`): a registry version (`NAME@ALIAS`, `NAME:VERSION`) or a training
  run, loaded sha-verified (through `release.load_version` / `inference.load_trained_model`), in
  eval mode, without gradients; a run records who it is (`Teacher.identity`) and a resume or an
  evaluation loads exactly those weights again (`load_recorded_teacher`);
- the loss (`distillation_loss`): `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) *
  CE(labels)`, mixup-aware (`mix_batch`);
- `Distillation`, the `training.Objective` that `fit` trains a student with: the teacher sees
  the very batch the student sees (augmented once, mixed once), under the same autocast, and
  each validation adds the student's top-1 agreement with the teacher (`valid_agreement`);
- `distill`: `flowerml distill`, a training run like any other (checkpoints, resume, DDP, AMP);
- measuring a student against its teacher on a split (`measure_agreement`), the student gate
  (`flowerml.gates`), what the card says about both models' cost (`model_profile`) and the
  release (`release_student`): a student registers under its own model name and is promoted on
  its own gate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowerml.distributed import Placement
from flowerml.errors import UserError
from flowerml.gates import GateScore, StudentGate, decide_student
from flowerml.inference import (
    TrainedModel,
    eval_batch_size,
    evaluate_run,
    load_trained_model,
)
from flowerml.loaders import build_eval_loader
from flowerml.manifest import PublishedDataset, resolve_dataset
from flowerml.models import build_model
from flowerml.progress import Progress
from flowerml.promotion import promote_released_student
from flowerml.recipes import DistillConfig, TrainConfig
from flowerml.registry import Registry
from flowerml.registry_names import RegistryError, parse_model_ref
from flowerml.release import build_card, load_version, register_run
from flowerml.runs import BEST, RunFiles, check_run_id
from flowerml.storage import S3Options, Store
from flowerml.training import (
    EventFn,
    FitResult,
    Objective,
    ValidationProbe,
    autocast_for,
    fit,
)
from flowerml.transforms import prepare_batch

DISTILLATION = "distillation"
STUDENT_SUFFIX = "-small"


class DistillError(UserError):
    """A teacher or student that cannot be used together, or a run that was not distilled."""


# --------------------------------------------------------------------------------------------
# The teacher


@dataclass
class Teacher:
    """A frozen model to learn from, and how a run records it (`identity`: source, name and
    version or run id, sha256, label)."""

    trained: TrainedModel
    identity: dict[str, Any]
    file_bytes: int

    @property
    def model(self) -> nn.Module:
        return self.trained.model

    @property
    def label(self) -> str:
        return self.identity["label"]

    def check_classes(self, published: PublishedDataset) -> None:
        """The student learns the teacher's outputs class by class: the lists must be equal."""
        if self.trained.class_names != published.class_names:
            raise DistillError(
                f"teacher {self.label} was trained on {len(self.trained.class_names)} classes "
                f"that differ from {published.dataset}@{published.version}'s "
                f"{published.num_classes}: a student can only learn the teacher's own classes")


def freeze(trained: TrainedModel) -> TrainedModel:
    """Eval mode (BatchNorm's running statistics, no dropout) and no gradients, for good."""
    trained.model.eval()
    trained.model.requires_grad_(False)
    return trained


def load_teacher(store: Store, *, ref: str | None = None, run_id: str | None = None,
                 device: str = "cpu") -> Teacher:
    """The teacher `--teacher NAME@ALIAS|NAME:VERSION` or `--teacher-run ID` names, its
    weights checksum-verified, frozen. An alias is resolved here, once: the run records the
    version it named."""
    if (ref is None) == (run_id is None):
        raise DistillError("give the teacher as --teacher NAME@ALIAS|NAME:VERSION or as "
                           "--teacher-run ID (one of them)")
    if ref is not None:
        return _registry_teacher(store, ref, device)
    return _run_teacher(store, run_id, device)


def _registry_teacher(store: Store, ref: str, device: str) -> Teacher:
    try:
        name, alias, number = parse_model_ref(ref)
        registry = Registry(store, name)
        chosen = registry.resolve(alias, number)
        trained = load_version(registry, chosen.version, device)
    except RegistryError as error:
        raise type(error)(f"--teacher {ref}: {error}") from None
    weights = store.head(f"registry/{name}/versions/{chosen.version:06d}/model.safetensors")
    identity = {"source": "registry", "name": name, "version": chosen.version,
                "sha256": chosen.weights_sha256, "label": chosen.label}
    return Teacher(freeze(trained), identity, weights.size if weights else 0)


def _run_teacher(store: Store, run_id: str, device: str) -> Teacher:
    run = RunFiles(store, check_run_id(run_id, "--teacher-run"))
    if not run.exists():
        raise DistillError(f"--teacher-run {run_id}: no such run on {store.uri}")
    trained = load_trained_model(store, run_id, device)
    identity = {"source": "run", "run_id": run_id, "sha256": trained.weights_sha256,
                "label": f"run {run_id}"}
    return Teacher(freeze(trained), identity, int(run.read_json(BEST.pointer)["size"]))


def load_recorded_teacher(store: Store, identity: dict[str, Any], device: str = "cpu") -> Teacher:
    """The teacher a run records, refused when its weights are no longer the recorded ones."""
    if identity["source"] == "registry":
        teacher = load_teacher(store, ref=f"{identity['name']}:{identity['version']}",
                               device=device)
    else:
        teacher = load_teacher(store, run_id=identity["run_id"], device=device)
    if teacher.identity["sha256"] != identity["sha256"]:
        raise DistillError(f"teacher {identity['label']} no longer holds the weights this run "
                           f"was distilled from (sha256 {identity['sha256'][:12]}..., now "
                           f"{teacher.identity['sha256'][:12]}...)")
    return teacher


def default_student_model(teacher: Teacher, dataset: str) -> str:
    """`<teacher-model>-small`; a teacher run has no model name, so its dataset's is used."""
    base = teacher.identity.get("name") or dataset
    return f"{base}{STUDENT_SUFFIX}"


# --------------------------------------------------------------------------------------------
# The loss


@dataclass(frozen=True)
class Mix:
    """A mixed batch: `weight * batch + (1 - weight) * batch[partner]`."""

    weight: float
    partner: torch.Tensor


def mix_batch(inputs: torch.Tensor, probability: float) -> tuple[torch.Tensor, Mix | None]:
    """With `probability`, the batch mixed with a shuffled copy of itself (mixup; the weight is
    uniform in [0, 1]). Draws come from torch's global RNG, which checkpoints keep, so a resumed
    run mixes exactly as an uninterrupted one; probability 0 draws nothing."""
    if probability <= 0 or len(inputs) < 2 or float(torch.rand(())) >= probability:
        return inputs, None
    weight = float(torch.rand(()))
    partner = torch.randperm(len(inputs)).to(inputs.device)
    return weight * inputs + (1 - weight) * inputs[partner], Mix(weight, partner)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, *, temperature: float, alpha: float,
                      label_smoothing: float = 0.0, mix: Mix | None = None) -> torch.Tensor:
    """`alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)`, batch means.

    Both distributions are softened by T; the T^2 keeps the soft term's gradients on the scale
    of the hard one's whatever T (Hinton et al. 2015). With `mix`, the labels are mixed with
    the same weight as the images; the teacher's logits already describe the mixed images."""
    student = student_logits.float()
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    hard = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    if mix is not None:
        hard = mix.weight * hard + (1 - mix.weight) * F.cross_entropy(
            student, targets[mix.partner], label_smoothing=label_smoothing)
    return alpha * soft + (1 - alpha) * hard


# --------------------------------------------------------------------------------------------
# The objective `fit` trains a student with


class Distillation(Objective):
    """Train the student on the teacher's outputs: the teacher sees each step's batch, as the
    student sees it, once; validation adds the student's agreement with the teacher."""

    def __init__(self, teacher: Teacher, settings: DistillConfig) -> None:
        self.teacher = teacher
        self.settings = settings
        self.label_smoothing = 0.0
        self.autocast: Callable = autocast_for(torch.device("cpu"), False)
        self.valid_teacher_top1: list[torch.Tensor] = []

    def prepare(self, published: PublishedDataset, placement: Placement,
                config: TrainConfig) -> None:
        self.teacher.check_classes(published)
        if config.strategy != "finetune":
            raise DistillError(f"--strategy {config.strategy} trains on cached features; a "
                               "student must see the images the teacher sees: use finetune")
        self.label_smoothing = config.label_smoothing
        self.autocast = autocast_for(placement.device, config.amp)
        self.teacher.model.to(placement.device)
        if config.channels_last and placement.device.type == "cuda":
            self.teacher.model.to(memory_format=torch.channels_last)

    def record(self) -> dict[str, Any]:
        return {"kind": DISTILLATION, "description": f"distillation from {self.teacher.label}",
                "teacher": self.teacher.identity, **self.settings.to_json()}

    def compute(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        view, mix = mix_batch(inputs, self.settings.mixup)
        with torch.no_grad():
            teacher_logits = self.teacher.model(view)
        logits = model(view)
        loss = distillation_loss(logits, teacher_logits, targets,
                                 temperature=self.settings.temperature,
                                 alpha=self.settings.alpha,
                                 label_smoothing=self.label_smoothing, mix=mix)
        return logits, loss

    def validation_probe(self) -> ValidationProbe:
        return AgreementProbe(self)

    @torch.no_grad()
    def teacher_top1(self, batch_index: int, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's predictions for the `batch_index`-th valid batch: computed in the
        first validation, then reused (valid is read whole, in order, without augmentation)."""
        if batch_index < len(self.valid_teacher_top1) \
                and len(self.valid_teacher_top1[batch_index]) == len(inputs):
            return self.valid_teacher_top1[batch_index]
        with self.autocast():
            predicted = self.teacher.model(inputs).argmax(dim=1)
        del self.valid_teacher_top1[batch_index:]
        self.valid_teacher_top1.append(predicted)
        return predicted


class AgreementProbe(ValidationProbe):
    """How often the student's top-1 equals the teacher's over one validation pass."""

    def __init__(self, distillation: Distillation) -> None:
        self.distillation = distillation
        self.batches = 0
        self.agreeing = 0
        self.images = 0

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        teacher = self.distillation.teacher_top1(self.batches, inputs)
        self.batches += 1
        self.agreeing += int((logits.argmax(dim=1) == teacher).sum())
        self.images += len(inputs)

    def result(self) -> dict[str, float]:
        return {"valid_agreement": self.agreeing / max(1, self.images)}


# --------------------------------------------------------------------------------------------
# A distillation run


@dataclass(frozen=True)
class DistillResult:
    """`flowerml distill --json`: the training run's fields, the teacher, the agreement."""

    fit: FitResult
    teacher: dict[str, Any]
    agreement_valid: float | None

    def to_json(self) -> dict[str, Any]:
        return {**self.fit.to_json(), "teacher": self.teacher,
                "agreement_valid": self.agreement_valid}


def distill(config: TrainConfig, settings: DistillConfig, teacher: Teacher, *, store: Store,
            dataset: str, run_id: str, cache_dir: Path, version: str | None = None,
            device: str = "auto", workers: int | None = None, s3: S3Options | None = None,
            on_event: EventFn | None = None, progress: Progress | None = None) -> DistillResult:
    """Train (or resume) student run `run_id` (arch `config.arch`) on `teacher`'s outputs; the
    best-on-valid epoch's agreement with the teacher is `agreement_valid`."""
    result = fit(config, store=store, dataset=dataset, run_id=run_id, cache_dir=cache_dir,
                 version=version, device=device, workers=workers, s3=s3, on_event=on_event,
                 progress=progress, objective=Distillation(teacher, settings))
    best = next((row for row in result.history if row["epoch"] == result.best_epoch), {})
    return DistillResult(result, teacher.identity, best.get("valid_agreement"))


def distillation_record(store: Store, run_id: str) -> dict[str, Any] | None:
    """The `objective` a run's config.json records when it was distilled, else None."""
    record = RunFiles(store, check_run_id(run_id, "--run")).read_optional_json("config.json")
    objective = record.get("objective") if isinstance(record, dict) else None
    return objective if isinstance(objective, dict) and objective.get("kind") == DISTILLATION \
        else None


# --------------------------------------------------------------------------------------------
# The student against its teacher on a split


@dataclass(frozen=True)
class Agreement:
    """A student and its teacher on the same split of the same manifest."""

    split: str
    n: int
    agreement: float
    student_top1: float
    teacher_top1: float
    teacher: dict[str, Any]
    dataset_version: str
    manifest_sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_agreement(store: Store, run_id: str, *, cache_dir: Path, split: str = "test",
                      version: str | None = None, device: str = "auto",
                      workers: int | None = None, batch_size: int | None = None) -> Agreement:
    """Top-1 agreement of a student run with its recorded teacher on `split`, and both models'
    top-1 there (each at its own image size); written to runs/<id>/eval/<split>/agreement.json."""
    student, teacher = load_student_and_teacher(store, run_id, device)
    return compare_on_split(store, run_id, student, teacher, cache_dir=cache_dir, split=split,
                            version=version, workers=workers, batch_size=batch_size)


def load_student_and_teacher(store: Store, run_id: str, device: str = "auto"
                             ) -> tuple[TrainedModel, Teacher]:
    """A distilled run's best weights and its recorded teacher, both checksum-verified."""
    objective = distillation_record(store, run_id)
    if objective is None:
        raise DistillError(f"run '{run_id}' was not distilled: it has no teacher")
    return (load_trained_model(store, run_id, device),
            load_recorded_teacher(store, objective["teacher"], device=device))


def compare_on_split(store: Store, run_id: str, student: TrainedModel, teacher: Teacher, *,
                     cache_dir: Path, split: str = "test", version: str | None = None,
                     workers: int | None = None, batch_size: int | None = None) -> Agreement:
    """`measure_agreement` with the two models loaded already (`batch_size`: by default
    `eval_batch_size`'s for the student's device)."""
    run = RunFiles(store, run_id)
    dataset = run.read_json("config.json")["dataset"]
    published = resolve_dataset(store, dataset["name"], version or dataset["version"])
    teacher.check_classes(published)
    student_loader, teacher_loader = (
        build_eval_loader(store, published, cache_dir, split=split, image_size=size,
                          batch_size=batch_size or eval_batch_size(student.device),
                          workers=workers)
        for size in (student.image_size, teacher.trained.image_size))
    n, agreeing, student_right, teacher_right = _count_agreement(
        student, teacher.trained, student_loader, teacher_loader)
    result = Agreement(split, n, agreeing / n, student_right / n, teacher_right / n,
                       teacher.identity, published.version, published.manifest_sha256)
    run.write_json(f"eval/{split}/agreement.json", result.to_json())
    return result


@torch.no_grad()
def _count_agreement(student: TrainedModel, teacher: TrainedModel, student_loader: Any,
                     teacher_loader: Any) -> tuple[int, int, int, int]:
    """(images, agreeing, student right, teacher right) over two loaders of the same split in
    the same order (each at its model's image size)."""
    n = agreeing = student_right = teacher_right = 0
    autocast = autocast_for(student.device, student.device.type == "cuda")
    for (student_batch, labels), (teacher_batch, _) in zip(student_loader, teacher_loader,
                                                           strict=True):
        with autocast():
            ours = student.model(prepare_batch(student_batch, student.device)).argmax(dim=1)
            theirs = teacher.model(prepare_batch(teacher_batch, teacher.device)).argmax(dim=1)
        labels = labels.to(student.device)
        n += len(labels)
        agreeing += int((ours == theirs.to(student.device)).sum())
        student_right += int((ours == labels).sum())
        teacher_right += int((theirs.to(student.device) == labels).sum())
    if n == 0:
        raise DistillError("the split has no images to compare the student and teacher on")
    return n, agreeing, student_right, teacher_right


# --------------------------------------------------------------------------------------------
# What a model costs: parameters, MACs, bytes, CPU speed


def count_macs(arch: str, num_classes: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers, as
    FLOPs / 2), counted on a parameter-less copy on the meta device: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(arch, num_classes).eval()
        images = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops() // 2)


@torch.inference_mode()
def cpu_images_per_second(model: nn.Module, image_size: int, *, batch_size: int = 8,
                          seconds: float = 1.0) -> float:
    """Forward passes per second on this machine's CPU (a copy of `model`, eval mode, fp32,
    torch's default threads), after one warm-up batch, for at least `seconds` and 2 batches."""
    copy_ = copy.deepcopy(model).cpu().eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    copy_(images)
    done, started = 0, time.perf_counter()
    while True:
        copy_(images)
        done += batch_size
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2 * batch_size:
            return round(done / elapsed, 2)


def model_profile(trained: TrainedModel, file_bytes: int, *, seconds: float = 1.0
                  ) -> dict[str, Any]:
    """Parameters, MACs per image, weights file size and CPU images/s of a model, at its own
    image size."""
    return {"arch": trained.arch, "image_size": trained.image_size,
            "params": sum(p.numel() for p in trained.model.parameters()),
            "macs": count_macs(trained.arch, len(trained.class_names), trained.image_size),
            "file_bytes": int(file_bytes),
            "cpu_images_per_second": cpu_images_per_second(trained.model, trained.image_size,
                                                           seconds=seconds),
            "cpu_threads": torch.get_num_threads()}


def compare_profiles(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Both profiles, measured in one process, and what the student saves."""
    return {"student": student, "teacher": teacher,
            "macs_ratio": round(teacher["macs"] / max(1, student["macs"]), 2),
            "params_ratio": round(teacher["params"] / max(1, student["params"]), 2),
            "cpu_speedup": round(student["cpu_images_per_second"]
                                 / max(teacher["cpu_images_per_second"], 1e-9), 2)}


# --------------------------------------------------------------------------------------------
# Releasing a student: evaluate, register under its own name, promote on its own gate


@dataclass(frozen=True)
class StudentRelease:
    """What `release_student` did: the version, the gate's verdict, whether the alias moved."""

    model: str
    version: int
    label: str
    alias: str
    passes: bool
    promoted: bool
    reasons: list[str]
    metrics: dict[str, Any]
    agreement: float
    teacher: dict[str, Any]
    teacher_top1: float
    efficiency: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def release_student(store: Store, run_id: str, *, cache_dir: Path, model: str | None = None,
                    alias: str = "production", gate: StudentGate = StudentGate(),  # noqa: B008
                    promote: bool = False, device: str = "auto", workers: int | None = None,
                    speed_seconds: float = 1.0) -> StudentRelease:
    """Evaluate student run `run_id` on test (the report, and its agreement with the teacher),
    register it as a version of `model` (default `<teacher-model>-small`) whose card records the
    teacher's lineage and both models' cost, and, with `promote`, move `alias` when the student
    gate passes. A retry after the version was registered reuses that version."""
    objective = distillation_record(store, run_id)
    if objective is None:
        raise DistillError(f"run '{run_id}' was not distilled: register it with flowerml "
                           "registry register")
    evaluation = evaluate_run(store, run_id, cache_dir=cache_dir, split="test", device=device,
                              workers=workers)
    student, teacher = load_student_and_teacher(store, run_id, device)
    agreement = compare_on_split(store, run_id, student, teacher, cache_dir=cache_dir,
                                 workers=workers)
    run = RunFiles(store, run_id)
    name = model or default_student_model(teacher, run.read_json("config.json")["dataset"]["name"])
    registry = Registry(store, name)
    metrics = evaluation.metrics.summary()
    passes, reasons = decide_student(
        GateScore(metrics["top1"], agreement.manifest_sha256),
        GateScore(agreement.teacher_top1, agreement.manifest_sha256), gate,
        teacher_label=teacher.label)
    efficiency = compare_profiles(
        model_profile(student, run.read_json(BEST.pointer)["size"], seconds=speed_seconds),
        model_profile(teacher.trained, teacher.file_bytes, seconds=speed_seconds))
    card = build_card(store, run_id, metrics, promote=passes, reasons=reasons,
                      gate={"kind": "student", **asdict(gate), "force": False})
    card |= {"teacher": {**teacher.identity, "arch": teacher.trained.arch,
                         "image_size": teacher.trained.image_size,
                         "test_top1": agreement.teacher_top1},
             "distillation": {key: objective[key] for key in ("temperature", "alpha", "mixup")}
             | {"agreement_test": agreement.agreement},
             "efficiency": efficiency}
    version = _registered_version(registry, run_id, student.weights_sha256) \
        or register_run(registry, store, run_id, card)
    promoted = promote and passes and promote_released_student(registry, version.version,
                                                                alias, reasons)
    if promote and passes and not promoted:
        reasons = [*reasons, f"{alias} moved to a newer version meanwhile: left there"]
    return StudentRelease(name, version.version, version.label, alias, passes, promoted, reasons,
                          metrics, agreement.agreement, teacher.identity, agreement.teacher_top1,
                          efficiency)


def _registered_version(registry: Registry, run_id: str, weights_sha256: str) -> Any:
    """The committed version of this run's weights, when an earlier attempt registered it."""
    return next((version for version in registry.versions() if version.committed
                 and version.weights_sha256 == weights_sha256
                 and version.card.get("lineage", {}).get("run_id") == run_id), None)

