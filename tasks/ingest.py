"""Prefect tasks for ingest: fetch the sources onto the store, publish the official split.

Thin adapters: read the settings, call one flowerml function, return a small JSON-able dict.
Both steps are idempotent, so retries (transient failures only) and re-runs are safe.

One retry layer per path: an HTTP download is retried by flowerml.io.download alone
(FLOWERML_DOWNLOAD_RETRIES, with Range resume, backoff and Retry-After); its final failure is a
`RetriesExhausted` that `retry_transient` does not retry here. Task retries are for what no layer
below retried: unknown failures, an unlisted 5xx, a store that stayed unreachable.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE
from prefect.tasks import exponential_backoff

from flowerml.data.ingest import fetch_sources, publish_split
from flowerml.data.source_files import FetchOptions
from flowerml.settings import build_store, load_settings
from tasks.common import LogProgress, retry_transient

# Within one flow run a finished step is not redone when the flow retries; across runs the
# content-addressed store makes a repeat cheap and correct.
PER_RUN_CACHE = INPUTS + TASK_SOURCE + RUN_ID


@task(name="fetch-sources", task_run_name="fetch {source}", retries=4,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=PER_RUN_CACHE)
def fetch_sources_task(source: str = "official", dataset: str | None = None,
                       store: str | None = None, verify: bool = False) -> dict:
    """Mirror the three checked source files to the store's datasets/<name>/raw/."""
    settings = load_settings(store=store, dataset=dataset)
    options = FetchOptions(verify=verify, retries=settings.download_retries,
                           timeout=settings.download_timeout, s3=settings.s3_options())
    target = build_store(settings)
    record = fetch_sources(source, target, settings.dataset, settings.cache_dir, options)
    return {"store": target.uri, "dataset": settings.dataset, "source": record["source"],
            "files": record["files"]}


@task(name="publish-split", task_run_name="publish {dataset}", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=PER_RUN_CACHE)
def publish_split_task(dataset: str | None = None, store: str | None = None) -> dict:
    """Publish the official split as a content-addressed version; returns the ingest summary."""
    settings = load_settings(store=store, dataset=dataset)
    result = publish_split(build_store(settings), settings.dataset, settings.cache_dir,
                           progress=LogProgress())
    return result.to_json()
