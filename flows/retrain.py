"""The `retrain_flowers` flow: ingest -> train -> evaluate -> decide -> register (+ promote)
(+ distil a student of the promoted model, when `distill.enabled`).

Its one parameter is a pydantic model derived from `flowerml.core.recipes.TrainConfig`, so the
Prefect UI renders a typed form (dropdowns for every choice, titles, bounds, descriptions) and
the API refuses a bad value before a run starts. Run it with `flowerml retrain`, `python -m
flows.retrain`, or a deployment (deploy/prefect.yaml).

Unattended runs: the training run id is the whole flow-run id, so a crashed run that the
recovery automation (deploy/automations/operations.yaml) puts back to Scheduled resumes its own
checkpoint, and no two flow runs ever share one; the flow gives up after `recovery_limit`
automatic recoveries; training has a timeout, and the flow one above it.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from flowerml.core.errors import UserError
from flowerml.core.recipes import (
    RECIPES,
    Device,
    TrainConfig,
    TrainOverrides,
    optional_field,
)
from flowerml.registry.gates import Gate
from flowerml.registry.names import DEFAULT_ALIAS
from flows.distill import DistillStageParams, Runner, distill_stage
from flows.run_once import run_once
from tasks.attempts import close_interrupted_attempts
from tasks.common import artifact_key
from tasks.evaluate import (
    evaluate_task,
    prepare_evaluation_split_task,
    publish_evaluation_task,
)
from tasks.export import export_task
from tasks.ingest import (
    fetch_sources_task,
    own_classes_task,
    publish_image_folder_task,
    publish_split_task,
)
from tasks.registry import (
    announce,
    check_up_to_date_task,
    decide_task,
    promote_task,
    register_task,
)
from tasks.train import train_task

TRAINING_TIMEOUT_S = 2 * 3600
# Three training attempts (the task retries twice) at their limit, plus ingest and evaluation.
FLOW_TIMEOUT_S = 3 * TRAINING_TIMEOUT_S + 2 * 3600
RECOVERY_LIMIT = 3


class TrainingParams(TrainOverrides):
    """How to train: a recipe, the options that override it, and where it runs."""

    device: Device = Field("auto", title="Device", description="auto picks CUDA when present.")
    workers: Annotated[int, Field(ge=0, le=64)] | SkipJsonSchema[None] = optional_field(
        title="DataLoader workers",
        description="Input-pipeline processes. Empty: one per CPU core.")
    nproc_per_node: int = Field(1, ge=1, le=16, title="GPUs per node",
                                description="More than 1 runs torchrun with DDP on that many GPUs.")
    timeout_s: float = Field(TRAINING_TIMEOUT_S, gt=0, le=7 * 24 * 3600,
                             title="Training timeout (seconds)",
                             description="Stop an attempt after this long; the retry resumes it "
                                         "from its last checkpoint.")
    checkpoint_every: int = Field(1, ge=1, le=1000,
                                  title="Checkpoint every N epochs",
                                  description="The resumable checkpoint (weights and optimiser "
                                              "state) after every N-th epoch and the last; a "
                                              "retry redoes the epochs since.")


class GateParams(BaseModel):
    """When a candidate may replace production."""

    threshold: float = Field(Gate.threshold, ge=0, le=1, title="Minimum test top-1")
    tolerance: float = Field(Gate.tolerance, ge=0, le=1, title="Allowed drop below production",
                             description="How far below production's test top-1 a candidate "
                                         "may score and still be promoted.")
    class_drop: float = Field(Gate.class_drop, ge=0, le=1,
                              title="Allowed drop of any one class below production",
                              description="How far below production's accuracy on a class the "
                                          "candidate's may fall (from both models' stored "
                                          "per-image predictions).")
    force: bool = Field(False, title="Force promotion",
                        description="Promote regardless of the gate (recorded in the history).")


class RetrainParams(BaseModel):
    """One retraining: where the data comes from, how to train, when to promote."""

    source: str = Field("official", title="Source",
                        description="official, a folder, a base URL or an s3:// prefix holding "
                                    "the three Flowers-102 files; or imagefolder:PATH (train/ "
                                    "valid/ test/ of your own class folders). A dataset of your "
                                    "own classes trains on its CURRENT version as it is")
    dataset: str = Field("flowers102", title="Dataset", description="Dataset name on the store")
    store: str | SkipJsonSchema[None] = optional_field(
        title="Store", description="Store URI. Empty: the worker's FLOWERML_STORE")
    verify: bool = Field(False, title="Verify checksums",
                         description="Check the official MD5s for non-official sources")
    training: TrainingParams = Field(default_factory=TrainingParams, title="Training")
    gate: GateParams = Field(default_factory=GateParams, title="Promotion gate")
    model_name: str = Field("flowers102", title="Model name", description="Registry model name")
    alias: str = Field(DEFAULT_ALIAS, title="Alias", description="Alias a passing model moves")
    export_onnx: bool = Field(True, title="Export to ONNX",
                              description="After registering, export the version to ONNX and "
                                          "check its parity with PyTorch on the test split; a "
                                          "failed parity check blocks promotion")
    export_int8: bool = Field(True, title="Also export int8",
                              description="With the ONNX export, write model.int8.onnx "
                                          "(static quantisation calibrated on the valid "
                                          "split), gated on the test split against fp32; a "
                                          "failed int8 gate does not block promotion: the "
                                          "version serves on fp32")
    recovery_limit: int = Field(RECOVERY_LIMIT, ge=0, le=20, title="Crash recoveries",
                                description="How many times a crashed run may be resumed "
                                            "automatically before it gives up")
    min_new_images: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = optional_field(
        title="Retrain only with this many new training images",
        description="Empty: retrain on any change. A number: end Up to date until the "
                    "dataset holds that many training images production was not trained on "
                    "(the retrain-on-new-data deployment sets 50)")
    force_train: bool = Field(False, title="Train even when up to date",
                              description="Train and register although production was trained "
                                          "on this dataset version with this config")
    distill: DistillStageParams = Field(default_factory=DistillStageParams,
                                        title="Distillation (optional last stage)")


class RecoveryLimitReached(UserError):
    """A flow run crashed more often than its parameters allow to resume it."""


def run_name() -> str:
    params = RetrainParams.model_validate(flow_run.parameters.get("params") or {})
    training = params.training
    arch = training.arch or RECIPES[training.recipe].get("arch", TrainConfig().arch)
    return f"retrain {params.model_name}: {arch} ({training.recipe}) on {params.dataset}"


def training_run_id(model_name: str, flow_run_id: object) -> str:
    """The training run of a flow run: its whole id, so that every retry and every recovery of
    this flow run resumes it, and no other flow run (UUIDv7 ids share their leading digits for
    about a minute) can ever share it."""
    return f"{model_name}-{flow_run_id}"


def check_recoveries(run_count: int, limit: int) -> None:
    """Refuse to go on once the run has been resumed after a crash more than `limit` times."""
    recoveries = max(run_count - 1, 0)
    if recoveries > limit:
        raise RecoveryLimitReached(
            f"this flow run has crashed {recoveries} times and recovery_limit allows {limit} "
            f"automatic resumptions, so it stops here instead of crashing again; its training "
            f"run keeps its checkpoints: read the crashed attempts' logs before a new run")


# The custom-run form's heading for the flow's one parameter (Prefect titles it `params`, the
# parameter's name, otherwise). No default: every run has its params (the deployment's or the
# caller's), and a parameter with a default reads "(Optional)" above the whole form.
RetrainForm = Annotated[RetrainParams, Field(json_schema_extra={"title": "Retrain settings"})]


@flow(name="retrain-flowers", flow_run_name=run_name, log_prints=True,
      timeout_seconds=FLOW_TIMEOUT_S)
def retrain_flowers(params: RetrainForm) -> dict[str, Any] | State:
    """Ingest, train, evaluate, and promote the model only when it clears the gate; end
    `Up to date` without training when production was trained on exactly this."""
    check_recoveries(flow_run.run_count, params.recovery_limit)
    close_interrupted_attempts(flow_run.id, flow_run.run_count)
    config, gate, model = params.training.config(), params.gate.model_dump(), params.model_name
    published = training_data(params)
    store, version = published["store"], published["current"]  # with any images added on top
    if not params.force_train:
        fresh = check_up_to_date_task(model, params.alias, params.dataset, version,
                                      config.to_json(), store=store,
                                      min_new_images=params.min_new_images)
        if fresh["up_to_date"]:
            return up_to_date(version, fresh)
    run_id = training_run_id(model, flow_run.id)
    # The test split is synced and decoded meanwhile, on the cycles training leaves idle.
    preparing = prepare_evaluation_split_task.submit(
        "test", config.arch, config.weights, config.image_size, store=store,
        dataset=params.dataset, dataset_version=version)
    train_task(run_id, config.to_json(), store=store, dataset=params.dataset,
               dataset_version=version, device=params.training.device,
               workers=params.training.workers, nproc_per_node=params.training.nproc_per_node,
               timeout_s=params.training.timeout_s,
               checkpoint_every=params.training.checkpoint_every)
    preparing.wait()
    evaluated = evaluate_task(run_id, "test", store=store, dataset_version=version,
                              publish=False)
    metrics = {k: evaluated[k] for k in ("top1", "top5", "mean_class_accuracy", "loss", "n")}
    decision = decide_task(model, params.alias, metrics, params.dataset, version, gate,
                           store=store, run_id=run_id)
    registered = register_task(run_id, model, metrics, decision, gate, store=store)
    # The export (ONNX graph, parity, int8) and the report's publishing (artifacts, MLflow)
    # run side by side; promotion reads export.json (parity, int8 gate), so it waits for both.
    exporting = export_task.submit(model, registered["version"], store=store,
                                   quantize="int8" if params.export_int8 else "none") \
        if params.export_onnx else None
    publishing = publish_evaluation_task.submit(run_id, "test", evaluated, store=store,
                                                artifact_prefix=artifact_key(model))
    exported = exporting.result() if exporting is not None else None
    publishing.result()
    promoted, reasons = False, decision["reasons"]
    if decision["promote"]:
        moved = promote_task(model, registered["version"], params.alias,
                             decision["candidate"], decision["champion"], gate, store=store)
        promoted, reasons = moved["promoted"], moved["reasons"]
    summary = {"up_to_date": False, "dataset_version": version, "run_id": run_id,
               "metrics": metrics, "promoted": promoted, "version": registered["version"],
               "reasons": reasons, "export": exported}
    announce(model, {**summary, "alias": params.alias, "paired": decision["paired"]})
    if params.distill.enabled:
        summary["distill"] = distill_promoted(params, config, run_id, registered, version, store) \
            if promoted else {"skipped": "the new model was not promoted: no student of it"}
    return summary


def training_data(params: RetrainParams) -> dict[str, Any]:
    """Publish what `source` names; `current` is the version to train on. Flowers-102's
    official split (re-published: a no-op when unchanged), a folder of one's own classes
    (`imagefolder:PATH`), or, for a dataset of one's own classes, its CURRENT as it is."""
    if params.source.startswith("imagefolder:"):
        return publish_image_folder_task(params.source, params.dataset, params.store)
    own = own_classes_task(params.dataset, params.store)
    if own is not None:
        return own
    fetched = fetch_sources_task(params.source, params.dataset, params.store, params.verify)
    return publish_split_task(fetched["dataset"], fetched["store"])


def up_to_date(dataset_version: str, fresh: dict[str, Any]) -> State:
    """The run's end when production was trained on exactly this: Completed, named so."""
    print(fresh["reason"])
    summary = {"up_to_date": True, "promoted": False, "dataset_version": dataset_version,
               "production": fresh["production"], "reasons": [fresh["reason"]]}
    return Completed(name="Up to date", message=fresh["reason"], data=summary)


def distill_promoted(params: RetrainParams, config: TrainConfig, run_id: str,
                     registered: dict[str, Any], dataset_version: str,
                     store: str | None) -> dict[str, Any]:
    """The optional `distill` stage (flows.distill): the version just promoted, trained with
    `config`, distilled into a student that is promoted on its own gate."""
    teacher = {"ref": f"{params.model_name}:{registered['version']}",
               "label": registered["label"], "dataset": params.dataset,
               "dataset_version": dataset_version, "training_config": config.to_json()}
    training = params.training
    runner = Runner(device=training.device, workers=training.workers,
                    nproc_per_node=training.nproc_per_node, timeout_s=training.timeout_s)
    return distill_stage(teacher, params.distill, runner, store=store,
                         run_id=f"{run_id}-student")


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.retrain '<params JSON>'`: run once, print the summary as JSON."""
    return run_once(retrain_flowers, RetrainParams, sys.argv[1:] if argv is None else argv,
                    name="retrain")

if __name__ == "__main__":
    sys.exit(main())
