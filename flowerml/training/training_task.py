"""Training tasks: what one training step computes (forward and loss), what each validation
pass adds, and what a run records about it.

`fit` trains with a task (timm's task/distillation split): `ClassificationTask`, cross-entropy
on the labels, is `flowerml train`'s; `flowerml.distillation.distillation_task.DistillationTask` is
`flowerml distill`'s. The loop around them (checkpoints, resume, DDP, AMP) is the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowerml.core.recipes import TrainConfig
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing
from flowerml.models.distributed import Placement


class ValidationProbe:
    """Extra numbers of one validation pass: sees each batch's inputs and the model's logits."""

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError


class TrainingTask:
    """The forward pass and loss of a training step, with what a run keeps about them. Hooks:
    - `prepare`: once the dataset is resolved and before anything is written: refuse what does
      not fit it, move to the device;
    - `record`: what config.json keeps as `objective` (None: nothing; its `description` names
      it in messages); a trained run resumes or extends only with the same record;
    - `compute`: (logits, loss) of one batch, called inside autocast: it runs the model itself;
    - `validation_probe`: extra numbers of each validation pass, added to the epoch's row;
    - `preprocessing`: the pixels a new run must see when the task decides them (None: the
      weights' own, `flowerml.models.weights.weights_preprocessing`).
    """

    def prepare(self, published: PublishedDataset, placement: Placement,
                config: TrainConfig) -> None:
        """Refuse a dataset or config this task cannot train on; place its parts."""

    def record(self) -> dict[str, Any] | None:
        return None

    def compute(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def validation_probe(self) -> ValidationProbe | None:
        return None

    def preprocessing(self, config: TrainConfig) -> Preprocessing | None:
        return None


class ClassificationTask(TrainingTask):
    """Cross-entropy of the model's logits with the labels (`flowerml train`'s, with the
    config's label smoothing); a run trained with it records no objective."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def compute(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        return logits, self.criterion(logits, targets)


def describe_task_record(record: dict[str, Any] | None) -> str:
    """How messages name what a run was trained with, from its config.json `objective`."""
    if record is None:
        return "cross-entropy on the labels (flowerml train)"
    return str(record.get("description") or record.get("kind") or "another objective")
