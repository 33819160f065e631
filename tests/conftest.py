"""Shared test fixtures: real parts only (moto's HTTP S3 server, Prefect's test harness, files),
and `synthetic_data`, which builds each synthetic archive, ingest and tiny trained run once; the
hooks that make every process a test starts die with pytest. Helpers live in tests/helpers/."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Three xdist workers share two cores, and every worker and child process would start one torch
# (OpenMP) thread per core, each spinning while it waits: one thread each halves the suite's CPU
# time (measured on the training, distillation and scoring modules: 256 -> 143 CPU-s, 137 -> 80 s).
# Set before anything imports torch; child processes inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

# This machine's environment sets PYTHONDONTWRITEBYTECODE=1, so every pytest process (each
# xdist worker, each nested session) compiled every test module again and rewrote its asserts:
# 2.6 of a worker's 10.3 CPU-s to collect the suite. Python's default instead: bytecode cached in
# __pycache__ (git ignores it), by this process and the processes it starts.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Prefect reads these when first imported: keep its state out of ~ and off the network.
_PREFECT_HOME = tempfile.mkdtemp(prefix="flowerml-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_API_URL"] = ""
os.environ.pop("PREFECT_API_KEY", None)
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
# The tests' S3 is moto; never let a developer's real AWS config leak in.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
for name in [n for n in os.environ if n.startswith("FLOWERML_")]:
    del os.environ[name]

if TYPE_CHECKING:  # the fixtures import what they use: a pytest that only loads this file
    # (tests/test_reaper.py's nested sessions, an xdist master) imports no flowerml, boto3 or
    # scipy for nothing
    from flowerml.io.storage import S3Options, Store
    from flowerml.io.storage_local import LocalStore
    from flowerml.io.storage_s3 import S3Store
    from tests.helpers.synthetic import RegisteredRun, SyntheticData


def pytest_configure(config: pytest.Config) -> None:
    """Every process this pytest process (master or xdist worker) starts dies with it, however
    it ends: normal end, Ctrl-C, SIGTERM, SIGKILL (tests/reaper.py). Before any fixture or
    xdist worker starts, so that each inherits this process's mark. The garbage collector runs
    on the schedule of the processes the console script starts (flowerml/core/garbage.py)."""
    from flowerml.core.garbage import collect_long_lived_objects_rarely
    from tests import reaper

    collect_long_lived_objects_rarely()

    is_xdist_master = (not hasattr(config, "workerinput")
                       and bool(config.getoption("numprocesses", None)))
    reaper.guard_this_process(pass_sigterm_to_children=is_xdist_master)
    if is_xdist_master:
        rewrite_test_modules_once(config)


@pytest.hookimpl(tryfirst=True)  # before xdist starts the workers
def pytest_sessionstart(session: pytest.Session) -> None:
    """An xdist master running the whole suite (not a selection by marks, such as `make
    test-fast`, which starts no Prefect server) migrates the workers' template database."""
    config = session.config
    if (not hasattr(config, "workerinput") and config.getoption("numprocesses", None)
            and not config.getoption("markexpr", "")):
        migrate_prefect_database_early(config)


def migrate_prefect_database_early(config: pytest.Config) -> None:
    """The workers' template Prefect database (`prefect_database`), migrated by the master in
    the background while the workers collect: otherwise the first worker to need it migrates it
    (7 s) while the others wait on its lock with a core idle. Where the master's temporary
    folder cannot be found (pytest's private `_tmp_path_factory`, as xdist itself uses), the
    first worker migrates it as before."""
    import threading

    from tests.helpers.prefect_database import migrated_database

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return
    folder = factory.getbasetemp() / PREFECT_DATABASE_FOLDER
    threading.Thread(target=migrated_database, args=(folder,), daemon=True,
                     name="migrate-prefect-database").start()


def rewrite_test_modules_once(config: pytest.Config) -> None:
    """The test modules the workers will collect, their asserts rewritten and cached (as pytest
    does on import) by the master before it starts them: on a fresh checkout each worker would
    otherwise rewrite every one itself, all at the same time. Pytest's own functions, which are
    not public: should they change, the workers rewrite as they always have."""
    try:
        from _pytest.assertion.rewrite import (
            PYC_TAIL,
            _read_pyc,
            _rewrite_test,
            _write_pyc,
            assertstate_key,
            get_cache_dir,
            try_makedirs,
        )

        state = config.stash[assertstate_key]
        paths = [Path(arg.split("::", 1)[0]) for arg in config.args] or [config.rootpath]
        for path in paths:
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            for source in files:
                if not (source.name.startswith("test_") or source.name == "conftest.py"):
                    continue
                cache = get_cache_dir(source)
                pyc = cache / (source.name[:-3] + PYC_TAIL)
                if _read_pyc(source, pyc) is None and try_makedirs(cache):
                    source_hash, code = _rewrite_test(source, config)
                    _write_pyc(state, code, source_hash, pyc)
    except Exception:  # noqa: BLE001 - only an optimisation
        return


# A test that needs one of these servers is slow (make test-fast starts none of them): the
# Prefect test server, SeaweedFS, moto's IAM-enforcing process (moto's threaded one is quick).
PREFECT_DATABASE_FOLDER = "prefect-db"  # in the master's basetemp, which every worker's is under
SERVER_FIXTURES = frozenset({"prefect_harness", "seaweedfs_endpoint", "denying_s3_endpoint"})


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a server fixture is marked slow. On an xdist worker, the slow modules
    come first, those allowed the longest (the largest timeout mark of their tests) first among
    them. `make test` hands out whole modules (--dist loadfile) in this order
    (--no-loadscope-reorder; xdist's own order, most tests first, started the deployment tests
    last): a minutes-long module that started last would run on alone while the other workers
    idle, and the many quick modules fill the end."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not hasattr(config, "workerinput"):
        return
    default_timeout = float(config.getini("timeout") or 0)
    rank: dict[str, tuple[float, bool]] = {}
    for item in items:
        timeout = item.get_closest_marker("timeout")
        allowed = float(timeout.args[0]) if timeout and timeout.args else default_timeout
        key = (item.get_closest_marker("slow") is None, -allowed)
        module = item.nodeid.split("::", 1)[0]
        rank[module] = min(rank.get(module, key), key)
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable


def pytest_runtest_logfinish() -> None:
    """A test that ran a command in-process which installs its own SIGTERM/SIGINT handlers
    (`flowerml retrain` does) must not leave the session unable to stop cleanly."""
    from tests import reaper

    reaper.restore_signal_handlers()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's threaded server, any free port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def denying_s3_endpoint() -> Iterator[str]:
    """A moto server that enforces IAM auth, so our test credentials are refused (HTTP 403)."""
    from tests.helpers.s3_servers import denying_moto_server

    with denying_moto_server() as url:
        yield url


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket for one test."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_options(moto_endpoint: str) -> S3Options:
    from flowerml.io.storage import S3Options

    return S3Options(endpoint_url=moto_endpoint, addressing_style="path")


@pytest.fixture
def s3_store(s3_bucket: str, s3_options: S3Options) -> S3Store:
    from flowerml.io.storage_s3 import S3Store

    return S3Store(s3_bucket, "store", s3_options, concurrency=8)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    from flowerml.io.storage_local import LocalStore

    return LocalStore(tmp_path / "store", concurrency=8)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each contract test runs against both implementations."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (SeaweedFS: master, volume, filer and S3 gateway in one `weed server`
    process) on free loopback ports, enforcing the test credentials; started once per session.

    Skipped, with the reason, only where the binary is missing or cannot start here."""
    from tests.helpers.s3_servers import seaweedfs_server

    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as url:
        yield url


@pytest.fixture
def seaweedfs_store(seaweedfs_endpoint: str) -> S3Store:
    """An S3Store on a fresh bucket of the session's SeaweedFS server."""
    import boto3

    from flowerml.io.storage import S3Options
    from flowerml.io.storage_s3 import S3Store

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=seaweedfs_endpoint).create_bucket(Bucket=name)
    return S3Store(name, "store", S3Options(endpoint_url=seaweedfs_endpoint,
                                            addressing_style="path"), concurrency=8)


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A Prefect database at head, migrated once for all xdist workers: every server the suite
    starts begins from a copy (tests/helpers/prefect_database.py)."""
    from tests.helpers.prefect_database import migrated_database

    base = tmp_path_factory.getbasetemp()
    return migrated_database((base if worker_id == "master" else base.parent)
                             / PREFECT_DATABASE_FOLDER)


@pytest.fixture(scope="session")
def prefect_harness(prefect_database: Path) -> Iterator[None]:
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from tests.helpers.prefect_database import seeded_test_harness

    with seeded_test_harness(prefect_database):
        yield


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory,
                   worker_id: str) -> SyntheticData:
    """The session's synthetic archives, ingests and trained runs, each built once for all
    xdist workers (in the folder their base temp dirs share, which is this session's own)."""
    from tests.helpers.synthetic import SyntheticData

    if worker_id == "master":
        return SyntheticData(tmp_path_factory.mktemp("synthetic-data"))
    root = tmp_path_factory.getbasetemp().parent / "synthetic-data"
    root.mkdir(exist_ok=True)
    return SyntheticData(root)


@pytest.fixture(scope="session")
def synthetic_source(synthetic_data: SyntheticData) -> Path:
    """A small archive in the official format: 4 classes x 6 images, 48 px (read-only)."""
    from tests.helpers.synthetic import SMALL_SPEC

    return synthetic_data.source(SMALL_SPEC)


@pytest.fixture
def source_copy(synthetic_source: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic source that a test may damage."""
    return Path(shutil.copytree(synthetic_source, tmp_path / "src"))


@pytest.fixture(scope="session")
def registered_run(synthetic_data: SyntheticData,
                   tmp_path_factory: pytest.TempPathFactory) -> RegisteredRun:
    """The tiny run evaluated, registered as flowers102:1 and made production (read-only):
    built once for all xdist workers (`SyntheticData.registered`), each worker's a copy."""
    from flowerml.registry.versions import Registry
    from tests.helpers.synthetic import DATASET, TINY_RUN, TINY_SPEC, RegisteredRun, tiny_config

    pristine = synthetic_data.registered(TINY_SPEC, TINY_RUN, tiny_config())
    store, cache = synthetic_data.copy(pristine, tmp_path_factory.mktemp("registered-run"))
    metrics = json.loads((pristine / "metrics.json").read_text())
    return RegisteredRun(store, cache, Registry(store, DATASET), metrics)
