"""Prefect tasks for ingest: fetch the sources onto the store, publish the official split, add
labelled images on top; each new version is announced as a `flowerml.dataset.published` event.

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
from prefect.events import emit_event
from prefect.tasks import exponential_backoff

from flowerml.data.add import add_images
from flowerml.data.ingest import fetch_sources, own_classes_source, publish_split
from flowerml.data.manifest import read_current
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
    if result.uploaded or result.replaced:  # a version new to the store, or CURRENT moved
        announce_published(result.dataset, result.version, parent=result.replaced,
                           added=result.counts, store=result.store)
    return result.to_json()


@task(name="publish-image-folder", task_run_name="publish {source} as {dataset}", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=PER_RUN_CACHE)
def publish_image_folder_task(source: str, dataset: str | None = None,
                              store: str | None = None) -> dict:
    """Publish a folder of one's own class folders (`imagefolder:PATH`, holding train/ valid/
    test/) as a content-addressed version; returns the ingest summary and the class names."""
    from flowerml.data.imagefolder import publish_image_folder
    from flowerml.io.locations import parse_source

    settings = load_settings(store=store, dataset=dataset)
    result, classes = publish_image_folder(
        parse_source(source), build_store(settings), settings.dataset, settings.cache_dir,
        s3=settings.s3_options(), progress=LogProgress())
    if result.uploaded or result.replaced:
        announce_published(result.dataset, result.version, parent=result.replaced,
                           added=result.counts, store=result.store)
    return {**result.to_json(), "classes": list(classes)}


@task(name="own-classes", task_run_name="is {dataset} of its own classes?", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def own_classes_task(dataset: str | None = None, store: str | None = None) -> dict | None:
    """A dataset of one's own classes (published from an imagefolder: nothing to fetch): its
    store and CURRENT version to train on; None for Flowers-102."""
    settings = load_settings(store=store, dataset=dataset)
    target = build_store(settings)
    source = own_classes_source(target, settings.dataset)
    if source is None:
        return None
    current = read_current(target, settings.dataset)
    return {"store": target.uri, "dataset": settings.dataset, "source": source,
            "current": current["version"]}


@task(name="add-images", task_run_name="add {source} to {dataset}", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=PER_RUN_CACHE)
def add_images_task(source: str, dataset: str | None = None, split: str = "train",
                    store: str | None = None) -> dict:
    """Publish CURRENT plus the labelled images SOURCE names (`flowerml ingest --add`)."""
    settings = load_settings(store=store, dataset=dataset)
    result = add_images(build_store(settings), settings.dataset, source, settings.cache_dir,
                        split=split, s3=settings.s3_options(), progress=LogProgress())
    if result.published:
        added = {split: sum(classes.values()) for split, classes in result.added.items()}
        announce_published(result.dataset, result.version, parent=result.parent, added=added,
                           store=result.store)
    return result.to_json()


def announce_published(dataset: str, version: str, *, parent: str | None,
                       added: dict[str, int], store: str) -> None:
    """`flowerml.dataset.published`: a new CURRENT to train on (retrain-on-new-data listens)."""
    emit_event(event="flowerml.dataset.published",
               resource={"prefect.resource.id": f"flowerml.dataset.{dataset}",
                         "prefect.resource.name": dataset},
               payload={"version": version, "parent": parent, "added": added, "store": store})
