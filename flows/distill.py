"""The `distill-flowers` flow: a small student distilled from the current champion, released on
its own gate; and the same stage as the retrain flow's optional last step.

The student trains the way its teacher was trained (the teacher's recorded training config:
image size, batch, augmentation, optimiser), with its own architecture and, when given, its own
epochs and weights. It registers under its own model name (default `<teacher-model>-small`) and
moves its own alias only when its test top-1 clears the threshold and is at most `max_gap` below
the teacher's, both measured on the same test manifest. Run it with the `distill-manual`
deployment (deploy/prefect.yaml) or `python -m flows.distill '<params JSON>'`.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from flowerml.core.recipes import (
    Device,
    DistillConfig,
    StudentArch,
    TrainConfig,
    load_config,
    optional_field,
)
from flowerml.registry.names import DEFAULT_ALIAS
from flows.run_once import run_once
from tasks.distill import distill_task, release_student_task, resolve_teacher_task

TRAINING_TIMEOUT_S = 2 * 3600
FLOW_TIMEOUT_S = 3 * TRAINING_TIMEOUT_S + 3600


class StudentGateParams(BaseModel):
    """When a student may move its alias."""

    threshold: float = Field(0.95, ge=0, le=1, title="Minimum test top-1")
    max_gap: float = Field(0.01, ge=0, le=1, title="Allowed gap below the teacher",
                           description="How far below its teacher's test top-1 (same test "
                                       "manifest) the student may score and be promoted.")


class StudentParams(BaseModel):
    """The student: its architecture, how it learns from the teacher, where it is released."""

    student: StudentArch = Field("mobilenet_v3_large", title="Student architecture")
    epochs: Annotated[int, Field(ge=1, le=1000)] | SkipJsonSchema[None] = optional_field(
        title="Epochs", description="Empty: the teacher's.")
    weights: str | SkipJsonSchema[None] = optional_field(
        title="Initial weights", description="imagenet, none, a file or an s3:// URI. "
        "Empty: what the teacher started from.")
    distillation: DistillConfig = Field(default_factory=DistillConfig, title="Distillation")
    model_name: str | SkipJsonSchema[None] = optional_field(
        title="Student model name", description="Empty: the teacher's model + '-small'.")
    alias: str = Field(DEFAULT_ALIAS, title="Student alias",
                       description="The alias of the student model a passing student moves")
    gate: StudentGateParams = Field(default_factory=StudentGateParams, title="Student gate")

    def config(self, teacher_config: dict[str, Any]) -> TrainConfig:
        """The teacher's training config with this student's arch (every stage trainable) and
        the epochs and weights given here."""
        values = {**teacher_config, "arch": self.student, "freeze_stages": 0,
                  "strategy": "finetune"}
        if self.epochs is not None:
            values["epochs"] = self.epochs
            values["warmup_epochs"] = min(values.get("warmup_epochs", 0.0), self.epochs)
        if self.weights is not None:
            values["weights"] = self.weights
        return load_config(json.dumps(values))


class DistillStageParams(StudentParams):
    """The retrain flow's optional last stage: a student of the model it just promoted."""

    enabled: bool = Field(False, title="Distil a student",
                          description="After the new model is promoted, distil it into a "
                                      "student and promote that on its own gate")


class Runner(BaseModel):
    """Where the student trains."""

    device: Device = Field("auto", title="Device", description="auto picks CUDA when present.")
    workers: Annotated[int, Field(ge=0, le=64)] | SkipJsonSchema[None] = optional_field(
        title="DataLoader workers", description="Empty: one per CPU core.")
    nproc_per_node: int = Field(1, ge=1, le=16, title="GPUs per node")
    timeout_s: float = Field(TRAINING_TIMEOUT_S, gt=0, le=7 * 24 * 3600,
                             title="Training timeout (seconds)")


class DistillParams(BaseModel):
    """One distillation: from which teacher, into which student, on which store."""

    teacher: str = Field("flowers102@production", title="Teacher",
                         description="NAME@ALIAS or NAME:VERSION; an alias is resolved once, "
                                     "when the run starts")
    store: str | SkipJsonSchema[None] = optional_field(
        title="Store", description="Empty: the worker's FLOWERML_STORE")
    student: StudentParams = Field(default_factory=StudentParams, title="Student")
    runner: Runner = Field(default_factory=Runner, title="Training")


def run_name() -> str:
    params = DistillParams.model_validate(flow_run.parameters.get("params") or {})
    return f"distill {params.teacher} into {params.student.student}"


def distill_stage(teacher: dict[str, Any], student: StudentParams, runner: Runner, *,
                  store: str | None, run_id: str) -> dict[str, Any]:
    """Train student run `run_id` on `teacher` (as `resolve_teacher_task` describes it), then
    release it on its own gate; returns the release with the run id."""
    config = student.config(teacher["training_config"])
    trained = distill_task(run_id, teacher["ref"], config.to_json(),
                           student.distillation.to_json(), store=store,
                           dataset=teacher["dataset"], dataset_version=teacher["dataset_version"],
                           device=runner.device, workers=runner.workers,
                           nproc_per_node=runner.nproc_per_node, timeout_s=runner.timeout_s)
    release = release_student_task(run_id, student.model_name, student.alias,
                                   student.gate.model_dump(), store=store, device=runner.device,
                                   workers=runner.workers)
    return {"run_id": run_id, "agreement_valid": trained.get("agreement_valid"), **release}


# The custom-run form's heading for the flow's one parameter (see flows/retrain.py's RetrainForm).
DistillForm = Annotated[DistillParams,
                        Field(json_schema_extra={"title": "Distillation settings"})]


@flow(name="distill-flowers", flow_run_name=run_name, log_prints=True,
      timeout_seconds=FLOW_TIMEOUT_S)
def distill_flowers(params: DistillForm) -> dict[str, Any]:
    """Distil the teacher (the current champion by default) into a student and release it."""
    teacher = resolve_teacher_task(params.teacher, params.store)
    return distill_stage(teacher, params.student, params.runner, store=params.store,
                         run_id=f"distill-{flow_run.id}")


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.distill '<params JSON>'`: run once, print the release as JSON; exit 1
    when the student gate refused it."""
    return run_once(distill_flowers, DistillParams, sys.argv[1:] if argv is None else argv,
                    name="distill")

if __name__ == "__main__":
    sys.exit(main())
