"""Fixtures the score flow's tests share (tests/flows/test_score.py, test_cli_cluster.py): the
registered tiny run on a module's own store, a folder of photos, and a real Dask cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.forkservers import stop_forkserver
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
def dask_forkserver() -> bool:
    """Whether `cluster`'s nannies start their workers from a forkserver that has imported
    what scoring needs once (Dask's own multiprocessing method "forkserver"), rather than by
    spawning each from scratch. A spawned worker spends ~5 CPU-s importing torch, Prefect and
    the score task before its first shard; forked from the forkserver, two workers and the
    restart of a killed one cost one import between them (test_score.py: ~43 -> ~39 CPU-s). A
    module with one worker that is never restarted gains nothing and overrides this."""
    return True


# What a worker imports to score a shard: Prefect, prefect-dask, torch, torchvision, the score
# flow and task, and the library's scoring.
SCORING_MODULES = ["distributed", "prefect_dask", "torch", "torchvision", "flows.score",
                   "tasks.score", "flowerml.serving.scoring"]


@pytest.fixture(scope="module")
def cluster(dask_workers: int, dask_forkserver: bool) -> Iterator[object]:
    """`dask_workers` single-threaded worker processes, each restarted by its nanny when
    killed; each a process of its own, however it is started (`dask_forkserver`)."""
    import dask
    from distributed import LocalCluster

    method = "forkserver" if dask_forkserver else "spawn"
    with dask.config.set({"distributed.worker.multiprocessing-method": method}):
        if dask_forkserver:
            from distributed.utils import get_mp_context

            # Dask sets its forkserver's preload list on its first call; ours replaces it
            # before the forkserver starts (with the first worker).
            get_mp_context().set_forkserver_preload(SCORING_MODULES)
        try:
            with LocalCluster(n_workers=dask_workers, threads_per_worker=1, processes=True,
                              host="127.0.0.1",
                              dashboard_address=":0", silence_logs=40) as local:
                yield local
        finally:
            if dask_forkserver:
                stop_forkserver()

