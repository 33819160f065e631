"""The distillation task `fit` trains a student with, and the run record it leaves.

- the loss (`distillation_loss`): `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) *
  CE(labels)`, mixup-aware (`mix_batch`);
- `DistillationTask`, a `training_task.TrainingTask`: the teacher sees the very batch the
  student sees (augmented once, mixed once, both decoded by the teacher's own preprocessing),
  under the same autocast, and each validation adds the student's top-1 agreement with the
  teacher (`valid_agreement`);
- what config.json records as the run's `objective` (`DistillationTask.record`), read back by
  `distillation_record`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowerml.core.documents import plain
from flowerml.core.recipes import DistillConfig, TrainConfig
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing
from flowerml.distillation.teacher import DistillError, Teacher
from flowerml.io.storage import Store
from flowerml.models.distributed import Placement
from flowerml.models.precision import autocast_for
from flowerml.training.runs import RunFiles, check_run_id
from flowerml.training.training_task import TrainingTask, ValidationProbe

DISTILLATION = "distillation"


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


class DistillationTask(TrainingTask):
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
        if config.channels_last:
            self.teacher.model.to(memory_format=torch.channels_last)

    def preprocessing(self, config: TrainConfig) -> Preprocessing:
        """The teacher's own preprocessing (what its run or card records): it sees the very
        batch the student sees, so both see the pixels the teacher was trained on; at another
        student size, the teacher's resize-to-crop ratio at that size."""
        theirs = self.teacher.trained.preprocessing
        if theirs.crop == config.image_size:
            return theirs
        return replace(theirs, resize=round(config.image_size * theirs.resize / theirs.crop),
                       crop=config.image_size)

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

    def __init__(self, distillation: DistillationTask) -> None:
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


def distillation_record(store: Store, run_id: str) -> dict[str, Any] | None:
    """The `objective` a run's config.json records when it was distilled, else None."""
    record = RunFiles(store, check_run_id(run_id, "--run")).optional_record()
    objective = record.objective if record is not None else None
    return plain(objective) if objective is not None and objective.kind == DISTILLATION \
        else None
