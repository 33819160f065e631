"""The `score-images` flow: list a collection once into shards, score each shard as a mapped
task, then write `_SUCCESS.json` (see `flowerml.serving.scoring` for the output layout).

The shards run on an existing engine, not a home-made one: with `dask_address` set
(`tcp://scheduler:8786`) they go to that Dask cluster through prefect-dask's `DaskTaskRunner`
(a LocalCluster, dask-kubernetes, Coiled...: any cluster the workers of which have flowerml
installed and reach the store), otherwise to a thread pool in the flow's own process. A worker
lost mid-shard is Dask's to handle: it reruns the shard elsewhere, and the create-only part
means it is written once. Run it with `python -m flows.score INPUT --model ... --output ...`,
or from the `score-images` deployment (deploy/prefect.yaml), whose form is this ScoreParams.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Literal

import click
from prefect import flow, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from flowerml.core.errors import FlowermlError, TransientError, UserError
from flowerml.core.extras import require_extra
from flowerml.core.recipes import optional_field
from tasks.score import finish_task, plan_task, score_shard_task

REQUEST_FIELDS = ("input", "model", "output", "runtime", "batch_size", "shard_size", "top_k",
                  "drift_threshold", "review_below")
SCHEDULER_TIMEOUT_S = 5.0


class ScoreParams(BaseModel):
    """One scoring run: what to score, with which model, where the results go, and where the
    shards run."""

    input: str = Field(title="Input", description="A folder, an s3:// prefix, a glob over "
                       "either, or a .txt/.json list of keys (relative to the list's folder), "
                       "paths or s3:// URIs")
    output: str = Field(title="Output", description="A folder or s3:// prefix; results go to "
                        "OUTPUT/<model>/<version>/<input-id>/")
    model: str = Field("flowers102@production", title="Model",
                       description="NAME@ALIAS or NAME:VERSION; an alias is resolved once, "
                                   "when the run starts")
    runtime: Literal["auto", "onnx", "onnx-int8", "torch"] = Field(
        "auto", title="Runtime", description="onnx needs a version whose export passed "
                                             "parity, onnx-int8 one whose int8 passed its "
                                             "gate; auto uses int8, else onnx, when there is one")
    batch_size: int = Field(64, ge=1, le=4096, title="Batch size")
    shard_size: int = Field(1000, ge=1, le=1_000_000, title="Images per shard")
    top_k: int = Field(5, ge=1, le=1000, title="Top-k flowers per image")
    drift_threshold: float = Field(
        0.2, ge=0, title="Drift threshold (PSI)",
        description="Above this population stability index (of top-1 probability or "
                    "predicted class, against the version's test baseline) the run emits "
                    "flowerml.model.drift")
    review_below: Annotated[float, Field(gt=0, le=1)] | SkipJsonSchema[None] = optional_field(
        title="Review below", description="Also write review.jsonl: the images whose top-1 "
        "probability is below this, least sure first, for a person to label; empty: none")
    store: str | SkipJsonSchema[None] = optional_field(
        title="Registry store", description="Empty: the worker's FLOWERML_STORE")
    dask_address: Annotated[str, Field(pattern=r"^(tcp|tls|ucx|ws|wss)://\S+$")] | \
        SkipJsonSchema[None] = optional_field(title="Dask scheduler",
        description="tcp://host:8786 runs the shards on that Dask cluster; empty: threads in "
                    "the flow's process")
    parallel: int = Field(2, ge=1, le=64, title="Shards at once without Dask")
    threads: Annotated[int, Field(ge=1, le=256)] | SkipJsonSchema[None] = optional_field(
        title="Threads per model call", description="Empty: the runtime's default (one per core)")

    def request(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in REQUEST_FIELDS}


def run_name() -> str:
    params = ScoreParams.model_validate(flow_run.parameters["params"])
    return f"score {params.input} with {params.model}"


def shard_runner(params: ScoreParams) -> Any:
    """prefect-dask's DaskTaskRunner on the given cluster, else a bounded thread pool (each
    running shard holds its decoded batches, so they are not all started at once)."""
    if params.dask_address:
        require_extra("dask", "dask_address")
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.dask_address)
    return ThreadPoolTaskRunner(max_workers=params.parallel)


def check_scheduler(address: str, option: str = "--dask-address",
                    timeout: float = SCHEDULER_TIMEOUT_S) -> None:
    """A Dask scheduler answers at `address` now: one line naming it, instead of the run
    failing after distributed's 30 s connect timeout, with the input already listed. A missing
    dask extra is one line too, before anything is listed."""
    import asyncio

    require_extra("dask", option)
    from distributed.comm import connect

    async def probe() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    try:
        asyncio.run(probe())
    except ValueError as error:  # a scheme distributed does not know
        raise UserError(f"{option} {address}: {error}") from None
    except OSError:
        raise TransientError(f"{option} {address}: no Dask scheduler answered within "
                             f"{timeout:g} s") from None


# The custom-run form's heading for the flow's one parameter (see flows/retrain.py's RetrainForm).
ScoreForm = Annotated[ScoreParams, Field(json_schema_extra={"title": "Scoring settings"})]


@flow(name="score-images", flow_run_name=run_name, log_prints=True)
def score_images(params: ScoreForm) -> dict[str, Any]:
    """List INPUT once into shards, score every shard (on Dask when asked), write _SUCCESS."""
    started = time.monotonic()
    runner = shard_runner(params)  # before the listing: a missing dask extra stops it first
    planned = plan_task(params.request(), params.store)
    if planned["success"] is not None:
        print(f"{planned['success']['output']} is complete already: nothing to do")
        return {**planned["success"], "already_complete": True}
    plan = planned["plan"]
    results = score_shards.with_options(task_runner=runner)(plan, params.threads)
    return finish_task(plan, results, time.monotonic() - started)


@flow(name="score-shards", flow_run_name="{plan[input_id]}: {plan[shards]} shards")
def score_shards(plan: dict[str, Any], threads: int | None = None) -> list[dict[str, Any]]:
    """Every shard of a plan as one mapped task, on this flow's task runner."""
    futures = score_shard_task.map(unmapped(plan), range(plan["shards"]), unmapped(threads))
    return futures.result()


@click.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("--model", default="flowers102@production", show_default=True)
@click.option("--output", required=True)
@click.option("--runtime", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True)
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--drift-threshold", type=float, default=0.2, show_default=True)
@click.option("--review-below", type=float, default=None)
@click.option("--store", default=None, help="Registry store (default: FLOWERML_STORE).")
@click.option("--dask-address", default=None, help="tcp://host:port of a Dask scheduler.")
@click.option("--parallel", type=int, default=2, show_default=True,
              help="Shards at once without Dask.")
@click.option("--threads", type=int, default=None, help="Threads per model call.")
def main(input_uri: str, **options: Any) -> None:
    """Run the score-images flow once and print its summary as JSON (exit 1 when some images
    could not be read, 2 on bad input)."""
    try:
        params = ScoreParams(input=input_uri, **options)
        if params.dask_address:
            check_scheduler(params.dask_address)
        summary = score_images(params)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]  # loc[1:] names a union's branch
        click.echo(f"flowerml: error: score parameter {first['loc'][0]}: {first['msg']}",
                   err=True)
        sys.exit(2)
    except FlowermlError as error:
        click.echo(f"flowerml: error: {error}", err=True)
        sys.exit(2)
    click.echo(json.dumps(summary, sort_keys=True))
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()
