"""The deployment tests' Prefect server (tests/deploy/test_deployment*.py): one per module, set
up as deploy/README.md says, so that the two modules run side by side on two xdist workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.deployment import NEW_DATA_TRIGGER, BatchedPrefect, short_zombie_automations
from tests.helpers.prefect_database import copy_database


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str,
                  prefect_database: Path) -> Iterator[BatchedPrefect]:
    """One server for the module, set up as the runbook says (pools, deployments, automations
    with the tests' short zombie threshold). Its loops that the tests wait on run every
    second or two instead of every 5-60 s: the scheduler's pass over deployments just
    registered, the proactive (zombie) triggers' evaluation, the late-runs marker, and the
    event persister's flush (the tests read stored events); workers ask for runs every
    second. Services that act on nothing these tests make are off: the foreman (marks
    workers and queues offline after a minute without a poll), the cancellation cleanup and
    the pause expirations (no run is cancelled or paused here)."""
    tmp_path = tmp_path_factory.mktemp("prefect-stack")
    prefect = BatchedPrefect(tmp_path, ui=True, env={
        "FLOWERML_S3_ENDPOINT_URL": moto_endpoint,
        "FLOWERML_CACHE_DIR": str(tmp_path / "cache"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    })
    copy_database(prefect_database, tmp_path / "prefect.db")  # LocalPrefect's database
    try:
        prefect.start_server()
        prefect.set_up_deployments(short_zombie_automations(tmp_path))
        # Each test's first ingest publishes flowers102 on its own bucket; the new-data trigger
        # would start runs of retrain-on-new-data with the real defaults in between. The test
        # of the trigger turns it on for itself.
        prefect.enable_automation(NEW_DATA_TRIGGER, False)
        yield prefect
    finally:
        prefect.stop()
