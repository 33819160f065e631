"""The `flowerml` commands about where work runs, which need Prefect or Dask and so live with
the flows: `flowerml score --dask-address` (the library's `score`, whose shards then run on a
Dask cluster through the `score-images` flow, as `python -m flows.score` runs them) and
`flowerml pools` (the Prefect work pools: paused or not, concurrency slots in use, the workers
polling each). flows/cli.py imports this module, which adds both to the `flowerml` group.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import sys
from typing import Any

import click

from flowerml.cli import CliError, cli, emit_json, json_option
from flowerml.cli.app import EXIT_REFUSED
from flows.local_prefect import prefect_settings, silence_prefect_console, stop_temporary_server
from flows.preflight import check_prefect_api
from flows.run_progress import show_progress_lines

# --------------------------------------------------------------------------------------------
# flowerml score --dask-address

# The command's options by the name of the ScoreParams field they set.
SCORE_OPTIONS = {"input": "INPUT", "model": "--model", "output": "--output",
                 "runtime": "--runtime", "batch_size": "--batch-size",
                 "shard_size": "--shard-size", "top_k": "--top-k", "store": "--store",
                 "dask_address": "--dask-address", "parallel": "--parallel",
                 "threads": "--threads"}

dask_address_option = click.Option(
    ["--dask-address"], default=None, metavar="tcp://HOST:PORT",
    help="A Dask scheduler: the shards run on its cluster, as the score-images flow (a "
         "Prefect flow run, reported to PREFECT_API_URL when set); its workers need flowerml "
         "and access to the store, the input and the output.")


def add_dask_address_to_score() -> None:
    """The library's `score` command, plus --dask-address: without it the command runs as
    before, in this process; with it the score-images flow scores the shards on Dask."""
    command = cli.commands["score"]
    if any(param.name == "dask_address" for param in command.params):
        return  # imported twice (as flows.cli_cluster and through a reload): added already
    in_process = command.callback
    command.params.insert(len(command.params) - 2, dask_address_option)  # before --store/--json

    @functools.wraps(in_process)
    def score(dask_address: str | None, **options: Any) -> None:
        if dask_address is None:
            return in_process(**options)
        return score_on_dask(dask_address, **options)

    command.callback = score


def score_params(dask_address: str, options: dict[str, Any]) -> Any:
    """The flow's ScoreParams from the command's options; a refused value is one line naming
    the option as typed."""
    from pydantic import ValidationError

    from flows.score import ScoreParams

    fields = {"input": options["input_uri"], "model": options["model_ref"],
              "dask_address": dask_address,
              **{name: options[name] for name in ("output", "runtime", "batch_size",
                                                  "shard_size", "top_k", "parallel",
                                                  "threads", "store")}}
    try:
        return ScoreParams.model_validate(fields)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        option = SCORE_OPTIONS.get(str(first["loc"][0]), str(first["loc"][0]))
        raise CliError(f"{option}: {first['msg']} (got {first.get('input')!r})") from None


def score_on_dask(dask_address: str, **options: Any) -> None:
    """The score-images flow with the shards on the Dask cluster at `dask_address`. The
    scheduler and the Prefect API are checked before anything is listed or written."""
    from flows.score import check_scheduler

    prefect_settings()
    params = score_params(dask_address, options)
    check_scheduler(dask_address)
    check_prefect_api()
    silence_prefect_console()
    show_progress_lines()
    from flows.score import score_images

    def announce(_flow: Any, flow_run: Any, _state: Any) -> None:
        click.echo(f"flowerml: flow run '{flow_run.name}' ({flow_run.id}): shards on the Dask "
                   f"scheduler {dask_address}", err=True)

    try:
        summary = score_images.with_options(on_running=[announce])(params)
    finally:
        stop_temporary_server()
    from flowerml.cli.score import print_summary

    if options["as_json"]:
        emit_json(summary)
    else:
        print_summary(summary)
    if summary["failed"]:
        sys.exit(EXIT_REFUSED)


add_dask_address_to_score()


# --------------------------------------------------------------------------------------------
# flowerml pools

# A run holds one of its pool's concurrency slots while it is in one of these states.
SLOT_STATES = ("PENDING", "RUNNING")
API_TIMEOUT_S = 5.0


@cli.command()
@json_option
def pools(as_json: bool) -> None:
    """The Prefect work pools: type, paused or not, concurrency limit and slots in use (its
    flow runs that are Pending or Running), runs due that wait for a slot or a worker
    (Scheduled, Late, Recovering), and the workers polling each, with their last heartbeat.

    Reads PREFECT_API_URL (or the Prefect profile's). An API that does not answer is one line
    and exit code 2.
    """
    rows = asyncio.run(read_pools())
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no work pools on {api_url_shown()}", err=True)
    now = datetime.datetime.now(datetime.UTC)
    for row in rows:
        click.echo(pool_line(row))
        for worker in row["workers"]:
            click.echo(f"  worker {worker['name']}: {worker['status'].lower()}, last heartbeat "
                       f"{heartbeat_age(worker['last_heartbeat'], now)}")
        if not row["workers"]:
            click.echo("  no worker polls it")


def pool_line(row: dict[str, Any]) -> str:
    limit = row["concurrency_limit"]
    slots = (f"{row['slots_in_use']}/{limit} slots in use" if limit is not None
             else f"{row['slots_in_use']} runs Pending/Running (no concurrency limit)")
    paused = ", PAUSED" if row["paused"] else ""
    return f"{row['name']} ({row['type']}{paused}): {slots}, {row['waiting']} waiting"


def heartbeat_age(when: str | None, now: datetime.datetime) -> str:
    if when is None:
        return "never"
    seconds = (now - datetime.datetime.fromisoformat(when)).total_seconds()
    return f"{when} ({max(seconds, 0):.0f} s ago)"


def api_url_shown() -> str:
    from prefect.settings import get_current_settings

    from flowerml.io.urls import redact_url

    url = get_current_settings().api.url
    return f"PREFECT_API_URL {redact_url(url)}" if url else "PREFECT_API_URL (not set)"


async def read_pools() -> list[dict[str, Any]]:
    """Every work pool with its slot use and its workers, from the Prefect API."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    check_api_configured()
    holding = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType[name] for name in SLOT_STATES])))
    # Due now or overdue: a weekly schedule's future runs are not waiting for anything yet.
    waiting = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(
            before_=datetime.datetime.now(datetime.UTC)))
    try:
        async with get_client(httpx_settings={"timeout": API_TIMEOUT_S}) as client:
            rows = []
            for pool in sorted(await client.read_work_pools(), key=lambda p: p.name):
                in_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool.name]))
                workers = await client.read_workers_for_work_pool(pool.name)
                rows.append({
                    "name": pool.name, "type": pool.type, "paused": pool.is_paused,
                    "concurrency_limit": pool.concurrency_limit,
                    "slots_in_use": await client.count_flow_runs(
                        flow_run_filter=holding, work_pool_filter=in_pool),
                    "waiting": await client.count_flow_runs(
                        flow_run_filter=waiting, work_pool_filter=in_pool),
                    "workers": [worker_row(worker) for worker in
                                sorted(workers, key=lambda w: w.name)]})
            return rows
    except httpx.HTTPError as error:  # Prefect's status errors are httpx's too
        raise unreachable(error) from None


def check_api_configured() -> None:
    """Without PREFECT_API_URL Prefect would start a temporary server of its own, whose pools
    are not the ones an operator asks about."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise CliError("PREFECT_API_URL is not set: point it at the Prefect server's API "
                       "(http://HOST:4200/api) to see its work pools", "bad-input")


def unreachable(error: Exception) -> CliError:
    import httpx
    from prefect.settings import get_current_settings

    from flowerml.io.storage_s3 import connection_failure
    from flowerml.io.urls import redact_url

    url = get_current_settings().api.url or ""
    if isinstance(error, httpx.HTTPStatusError):
        cause = f"HTTP {error.response.status_code}"
    elif isinstance(error, httpx.TimeoutException):
        cause = f"no answer within {API_TIMEOUT_S:g} s"
    else:
        cause = connection_failure(error, httpx.URL(url).host)
    return CliError(f"Prefect API {redact_url(url)} (PREFECT_API_URL) is unreachable: {cause}",
                    "unavailable")


def worker_row(worker: Any) -> dict[str, Any]:
    heartbeat = worker.last_heartbeat_time
    return {"name": worker.name, "status": str(worker.status.value),
            "last_heartbeat": heartbeat.isoformat() if heartbeat else None}
