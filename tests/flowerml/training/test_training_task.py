"""flowerml.training.training_task: what a step computes, and how messages name what a run trained with;
a `Stepper` (flowerml.training.optimization) takes the task's loss through one optimisation step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from flowerml.training.optimization import Stepper
from flowerml.training.training_task import ClassificationTask, TrainingTask, describe_task_record


def test_classification_is_cross_entropy_with_label_smoothing_and_records_nothing() -> None:
    model = torch.nn.Linear(3, 4)
    inputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    logits, loss = ClassificationTask(label_smoothing=0.1).compute(model, inputs, targets)
    assert torch.equal(logits, model(inputs))
    assert loss.item() == pytest.approx(
        F.cross_entropy(model(inputs), targets, label_smoothing=0.1).item())
    assert ClassificationTask().record() is None
    assert ClassificationTask().validation_probe() is None


def test_a_stepper_optimises_the_loss_its_task_computes() -> None:
    class Doubled(TrainingTask):
        def compute(self, model, inputs, targets):
            logits = model(inputs)
            return logits, 2 * F.cross_entropy(logits, targets)

    def stepper(task: TrainingTask) -> Stepper:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return Stepper(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1),
                       task, contextlib.nullcontext, None)

    inputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    plain, doubled = stepper(ClassificationTask()), stepper(Doubled())
    start = [p.detach().clone() for p in plain.model.parameters()]
    with torch.no_grad():
        right = int((plain.model(inputs).argmax(dim=1) == targets).sum())
    plain_loss, correct = plain.step(inputs, targets)
    doubled_loss, _ = doubled.step(inputs, targets)
    assert doubled_loss.item() == pytest.approx(2 * plain_loss.item())
    assert int(correct) == right  # counted on the logits the step computed, before it
    for origin, once, twice in zip(start, plain.model.parameters(), doubled.model.parameters(),
                                   strict=True):
        assert torch.allclose(origin - twice.detach(), 2 * (origin - once.detach()), atol=1e-6)

@pytest.mark.parametrize(("record", "named"), [
    (None, "cross-entropy on the labels (flowerml train)"),
    ({"kind": "distillation", "description": "distillation from flowers102:000001"},
     "distillation from flowers102:000001"),
    ({"kind": "distillation"}, "distillation"),
    ({}, "another objective"),
])
def test_messages_name_what_a_run_was_trained_with(record, named) -> None:
    assert describe_task_record(record) == named
