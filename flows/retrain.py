"""The `retrain_flowers` flow: ingest -> train -> evaluate -> decide -> register (+ promote).

Its one parameter is a pydantic model, so the Prefect UI renders a typed form with defaults and
descriptions. Run it with `flowerml retrain`, `python -m flows.retrain`, or a deployment.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, ValidationError

from flowerml.errors import FlowermlError
from flowerml.recipes import RECIPES, TrainConfig
from tasks.evaluate import evaluate_task
from tasks.ingest import fetch_sources_task, publish_split_task
from tasks.registry import announce, decide_task, promote_task, register_task
from tasks.train import train_task


class TrainingParams(BaseModel):
    """How to train; unset values come from the recipe."""

    recipe: str = Field("default", description="default, tutorial, linear-probe or demo")
    arch: str | None = Field(None, description="resnet18/34/50/101/152, alexnet, vgg16, vgg19 "
                                               "(recipe default: resnet152)")
    weights: str | None = Field(None, description="imagenet, none, a path or an s3:// URI")
    strategy: str | None = Field(None, description="finetune or linear-probe")
    augment: str | None = Field(None, description="standard, tutorial or none")
    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=1, le=4096)
    lr: float | None = Field(None, gt=0, le=10)
    image_size: int | None = Field(None, ge=32, le=1024)
    device: str = Field("auto", description="auto, cpu or cuda")
    workers: int | None = Field(None, ge=0, le=64, description="DataLoader workers")
    nproc_per_node: int = Field(1, ge=1, le=16, description="GPUs: >1 runs torchrun with DDP")
    timeout_s: float | None = Field(None, gt=0, description="Stop training after this long")

    def options(self) -> dict[str, Any]:
        """The `flowerml train` options this sets."""
        return self.model_dump(exclude={"nproc_per_node", "timeout_s"}, exclude_none=True)


class GateParams(BaseModel):
    """When a candidate may replace production."""

    threshold: float = Field(0.95, ge=0, le=1, description="Minimum test top-1")
    tolerance: float = Field(0.005, ge=0, le=1,
                             description="Allowed drop below production's test top-1")
    force: bool = Field(False, description="Promote regardless of the gate (recorded)")


class RetrainParams(BaseModel):
    """One retraining: where the data comes from, how to train, when to promote."""

    source: str = Field("official", description="official, a folder, a base URL or an s3:// "
                                                "prefix holding the three Flowers-102 files")
    dataset: str = Field("flowers102", description="Dataset name on the store")
    store: str | None = Field(None, description="Store URI (default: FLOWERML_STORE)")
    verify: bool = Field(False, description="Check the official MD5s for non-official sources")
    training: TrainingParams = Field(default_factory=TrainingParams)
    gate: GateParams = Field(default_factory=GateParams)
    model_name: str = Field("flowers102", description="Registry model name")
    alias: str = Field("production", description="Alias a passing model moves")


def run_name() -> str:
    params = RetrainParams.model_validate(flow_run.parameters.get("params") or {})
    training = params.training
    arch = training.arch or RECIPES.get(training.recipe, {}).get("arch", TrainConfig.arch)
    return f"retrain {params.model_name}: {arch} ({training.recipe}) on {params.dataset}"


@flow(name="retrain-flowers", flow_run_name=run_name, log_prints=True)
def retrain_flowers(params: RetrainParams = RetrainParams()) -> dict[str, Any]:  # noqa: B008
    """Ingest, train, evaluate, and promote the model only when it clears the gate."""
    gate = params.gate.model_dump()
    fetched = fetch_sources_task(params.source, params.dataset, params.store, params.verify)
    published = publish_split_task(fetched["dataset"], fetched["store"])
    store, version = published["store"], published["version"]
    run_id = f"{params.model_name}-{str(flow_run.id)[:8]}"  # a task retry resumes this run
    train_task(run_id, params.training.options(), store=store, dataset=params.dataset,
               dataset_version=version, nproc_per_node=params.training.nproc_per_node,
               timeout_s=params.training.timeout_s)
    evaluated = evaluate_task(run_id, "test", store=store, dataset_version=version)
    metrics = {k: evaluated[k] for k in ("top1", "top5", "mean_class_accuracy", "loss", "n")}
    decision = decide_task(params.model_name, params.alias, metrics, params.dataset, version,
                           gate, store=store)
    registered = register_task(run_id, params.model_name, metrics, decision, gate, store=store)
    promoted, reasons = False, decision["reasons"]
    if decision["promote"]:
        moved = promote_task(params.model_name, registered["version"], params.alias,
                             decision["candidate"], decision["champion"], gate, store=store)
        promoted, reasons = moved["promoted"], moved["reasons"]
    summary = {"dataset_version": version, "run_id": run_id, "metrics": metrics,
               "promoted": promoted, "version": registered["version"], "reasons": reasons}
    announce(params.model_name, {**summary, "alias": params.alias})
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.retrain '<params JSON>'`: run once, print the summary as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        params = RetrainParams.model_validate_json(argv[0] if argv else "{}")
        summary = retrain_flowers(params)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        print(f"flowerml: error: retrain parameter {field}: {first['msg']}", file=sys.stderr)
        return 2
    except FlowermlError as error:
        print(f"flowerml: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
