"""A student against its teacher on one split: how often their top-1s agree, and each one's
top-1, both measured on the same manifest (each model at its own image size); written to
`runs/<id>/eval/<split>/agreement.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowerml.core.documents import Sha256, StoredDocument, plain
from flowerml.data.loaders import build_eval_loader
from flowerml.data.manifest import resolve_dataset
from flowerml.data.transforms import normalising, prepare_batch
from flowerml.distillation.distillation_task import distillation_record
from flowerml.distillation.teacher import DistillError, Teacher, load_recorded_teacher
from flowerml.evaluation.inference import TrainedModel, eval_batch_size, load_trained_model
from flowerml.io.storage import Store
from flowerml.models.precision import autocast_for
from flowerml.training.runs import RunFiles

AGREEMENT_FILE = "agreement.json"


class Agreement(StoredDocument):
    """A student and its teacher on the same split of the same manifest:
    `runs/<run_id>/eval/<split>/agreement.json` (its `teacher` is the run's recorded one)."""

    split: str
    n: int
    agreement: float
    student_top1: float
    teacher_top1: float
    teacher: dict[str, Any]
    dataset_version: str
    manifest_sha256: Sha256

    def to_json(self) -> dict[str, Any]:
        return plain(self)


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
    dataset = run.record().dataset
    published = resolve_dataset(store, dataset.name, version or dataset.version)
    teacher.check_classes(published)
    student_loader, teacher_loader = (
        build_eval_loader(store, published, cache_dir, split=split,
                          image_size=model.image_size, preprocessing=model.preprocessing,
                          batch_size=batch_size or eval_batch_size(student.device),
                          workers=workers)
        for model in (student, teacher.trained))
    n, agreeing, student_right, teacher_right = _count_agreement(
        student, teacher.trained, student_loader, teacher_loader)
    result = Agreement(split=split, n=n, agreement=agreeing / n, student_top1=student_right / n,
                       teacher_top1=teacher_right / n, teacher=teacher.identity,
                       dataset_version=published.version,
                       manifest_sha256=published.split_sha256(split))
    run.write(f"eval/{split}/{AGREEMENT_FILE}", result)
    return result


@torch.no_grad()
def _count_agreement(student: TrainedModel, teacher: TrainedModel, student_loader: Any,
                     teacher_loader: Any) -> tuple[int, int, int, int]:
    """(images, agreeing, student right, teacher right) over two loaders of the same split in
    the same order (each at its model's own preprocessing)."""
    n = agreeing = student_right = teacher_right = 0
    autocast = autocast_for(student.device, student.device.type == "cuda")
    for (student_batch, labels), (teacher_batch, _) in zip(student_loader, teacher_loader,
                                                           strict=True):
        with autocast():
            ours = student.model(prepare_batch(
                student_batch, student.device, **normalising(student.preprocessing))).argmax(1)
            theirs = teacher.model(prepare_batch(
                teacher_batch, teacher.device, **normalising(teacher.preprocessing))).argmax(1)
        labels = labels.to(student.device)
        n += len(labels)
        agreeing += int((ours == theirs.to(student.device)).sum())
        student_right += int((ours == labels).sum())
        teacher_right += int((theirs.to(student.device) == labels).sum())
    if n == 0:
        raise DistillError("the split has no images to compare the student and teacher on")
    return n, agreeing, student_right, teacher_right
