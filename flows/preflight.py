"""What `flowerml retrain` checks before anything starts (no Prefect server, no ingest, nothing
written): the model name and alias, the source, the weights, the device, that the store takes
writes with these credentials, and that the Prefect API named by PREFECT_API_URL answers.
Each refusal is one `flowerml: error:` line (a `CliError` or a library `UserError`)."""

from __future__ import annotations

from typing import Any

from flowerml.cli import CliError
from flowerml.core.recipes import TrainConfig
from flowerml.settings import Settings

PREFECT_API_TIMEOUT_S = 5.0


def check_names(model_name: str, alias: str) -> None:
    from flowerml.registry.names import check_name

    check_name(model_name)
    check_name(alias, "alias")


def check_source(params: Any, preset: str | None, source: str | None) -> None:
    """The source's form, and a local one an existing folder (the demo's is written later)."""
    from flowerml.data.source_files import resolve_source
    from flowerml.io.locations import parse_source

    if preset == "demo" and source is None:
        return
    if params.source.startswith("imagefolder:"):
        parse_source(params.source)  # its folders are read when the flow publishes them
        return
    resolve_source(params.source)


def check_weights(config: TrainConfig) -> None:
    """`--weights` as far as it can be checked without downloading (`flowerml.models.weights.
    check_weights_value`): a known form, and a local file that is a regular file, loads as a
    state dict weights-only and fits the arch's backbone. `imagenet` and s3:// files are
    fetched, and checked the same way, by the training child."""
    if config.weights.strip().lower() in ("none", "imagenet"):
        return  # no torch import for the common case
    # torch: imported only for a file the user named
    from flowerml.models.weights import check_weights_value

    check_weights_value(config.weights, config.arch)


def check_store_writable(settings: Settings) -> None:
    """The store takes writes with these credentials (`Store.check_writable`: a create-only
    probe object under `_probe/`, deleted at once): a read-only key is refused here, not at the
    first upload after the ingest's and the training's work."""
    from flowerml.settings import build_store

    build_store(settings).check_writable()  # a local store not made yet is not made here


def check_device(device: str) -> None:
    if device == "cuda":
        from flowerml.models.distributed import select_device  # torch: only when CUDA is asked for

        select_device(device)


def check_prefect_api() -> None:
    """When PREFECT_API_URL (or the Prefect profile) names a server, it must answer now: one
    line naming the URL and the cause, instead of a minute of retried connection errors.

    The Prefect client's own health check (`api_healthcheck`, GET /health with the profile's
    key, auth string and TLS settings), tried once: its retries are that minute."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings, temporary_settings

    from flowerml.io.storage_s3 import connection_failure
    from flowerml.io.urls import redact_url, url_problem

    url = get_current_settings().api.url
    if not url:
        return  # ephemeral mode: the flow starts a temporary local server
    shown = redact_url(url)
    problem = url_problem(url)
    if problem:
        raise CliError(f"PREFECT_API_URL {shown} {problem}")
    with temporary_settings(updates={"client.max_retries": 0}), get_client(
            sync_client=True, httpx_settings={"timeout": PREFECT_API_TIMEOUT_S}) as client:
        failure = client.api_healthcheck()
    if failure is None:
        return
    if not isinstance(failure, httpx.HTTPError):
        raise failure  # not the server's answer: a bug to see whole
    if isinstance(failure, httpx.HTTPStatusError):
        status = failure.response.status_code
        raise CliError(f"Prefect API {shown} (PREFECT_API_URL) answered HTTP {status} to GET "
                       f"/health: is it a Prefect server's API URL (http://HOST:4200/api)?",
                       "unavailable" if status >= 500 else "bad-input")
    if isinstance(failure, httpx.TimeoutException):
        cause = f"no answer within {PREFECT_API_TIMEOUT_S:g} s"
    else:
        cause = connection_failure(failure, httpx.URL(url).host)
    raise CliError(f"Prefect API {shown} (PREFECT_API_URL) is unreachable: {cause}; start "
                   f"that server, correct the URL, or unset PREFECT_API_URL to run with a "
                   f"temporary local server", "unavailable")
