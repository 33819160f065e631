"""Fixtures the score flow's tests share (tests/flows/test_score.py, test_cli_cluster.py): the
registered tiny run on a module's own store, a folder of photos, and a real Dask cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.scoring import write_photos
from tests.helpers.stores import copy_tree
from tests.helpers.synthetic import RegisteredRun


@pytest.fixture(scope="module")
def registry_root(registered_run: RegisteredRun,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered tiny run (flowers102:1 in production) on this module's own store."""
    return copy_tree(registered_run.store.root, tmp_path_factory.mktemp("score-flow") / "store")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def dask_workers() -> int:
    """How many worker processes `cluster` starts: two, so that one killed leaves another (a
    module that needs only "on the cluster, not here" overrides this with 1: each worker
    imports torch and loads the model, seconds of CPU)."""
    return 2


@pytest.fixture(scope="module")
def cluster(dask_workers: int) -> Iterator[object]:
    """`dask_workers` single-threaded worker processes, each restarted by its nanny when
    killed."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=dask_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1",
                      dashboard_address=":0", silence_logs=40) as local:
        yield local
