"""Knowledge distillation: `flowerml distill` (a student trained on a frozen teacher's outputs)
and the student's release.

This module owns:
- `distill`: a training run like any other (checkpoints, resume, DDP, AMP) whose task is the
  `DistillationTask` (`flowerml.distillation.distillation_task`: the loss, the teacher seeing the student's
  view, the validation agreement) with a `Teacher` (`flowerml.distillation.teacher`);
- the release (`release_student`): a student evaluated on test, measured against its teacher
  (`flowerml.distillation.agreement`) and on cost (`flowerml.distillation.model_cost`), registered under its own model
  name and promoted on its own gate (`flowerml.registry.gates.decide_student`,
  `flowerml.registry.promotion.promote_released_student`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowerml.core.progress import Progress
from flowerml.core.recipes import DistillConfig, TrainConfig
from flowerml.distillation.agreement import compare_on_split, load_student_and_teacher
from flowerml.distillation.distillation_task import DistillationTask, distillation_record
from flowerml.distillation.model_cost import compare_profiles, model_profile
from flowerml.distillation.teacher import DistillError, Teacher, default_student_model
from flowerml.evaluation.inference import evaluate_run
from flowerml.io.storage import S3Options, Store
from flowerml.registry.gates import GateScore, StudentGate, decide_student
from flowerml.registry.promotion import promote_released_student
from flowerml.registry.release import build_card, register_run
from flowerml.registry.versions import Registry
from flowerml.training.epoch_loop import EventFn
from flowerml.training.fit import FitResult, fit
from flowerml.training.runs import BEST, RunFiles

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
                 progress=progress, task=DistillationTask(teacher, settings))
    best = next((row for row in result.history if row["epoch"] == result.best_epoch), {})
    return DistillResult(result, teacher.identity, best.get("valid_agreement"))


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
    name = model or default_student_model(teacher, run.record().dataset.name)
    registry = Registry(store, name)
    metrics = evaluation.metrics.summary()
    passes, reasons = decide_student(
        GateScore(metrics["top1"], agreement.manifest_sha256),
        GateScore(agreement.teacher_top1, agreement.manifest_sha256), gate,
        teacher_label=teacher.label)
    efficiency = compare_profiles(
        model_profile(student, run.read_pointer(BEST.pointer)["size"], seconds=speed_seconds),
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

