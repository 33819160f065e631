"""What every bench script shares: its progress lines, the machine's facts and load, a process's
peak memory and CPU time, a cached folder built whole or not at all (the synthetic archives),
and a synthetic archive published into a local store.

The scripts run as `python bench/<script>.py`, so this folder is first on `sys.path` and they
import this module as `common`. Only the standard library is imported at module level: the GPU
image that runs bench/gpu.py has few packages, and flowerml is imported where it is used.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
DATASET = "flowers102"
FACTS_FILE = "facts.json"


def progress_log(name: str) -> Callable[[str], None]:
    """A `log(message)` that prints `[name HH:MM:SS] message` on stderr (stdout holds the JSON)."""

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


log = progress_log("bench")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, to two decimals: how busy the machine was."""
    return [round(load, 2) for load in os.getloadavg()]


def machine_facts() -> dict:
    """The platform, Python and processor this run measured on."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM; ru_maxrss where /proc is missing).

    On Linux `ru_maxrss` carries the parent's peak across fork+exec, so a child measuring its
    own memory reads VmHWM."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (MB if sys.platform == "darwin" else 1024)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cached_folder(target: Path, build: Callable[[Path], dict]) -> tuple[dict, bool]:
    """The facts of `target`, built by `build(folder)` on first use; (facts, whether cached).

    The folder is built in a staging folder beside it and renamed into place with its facts,
    so a half-built folder (an interrupted run) is never taken for a built one."""
    facts_file = target / FACTS_FILE
    if facts_file.is_file():
        return json.loads(facts_file.read_text()), True
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        facts = build(staging)
        (staging / FACTS_FILE).write_text(json.dumps(facts))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return facts, False


def synthetic_archive(workdir: Path, classes: int, per_class: int, size: int,
                      quality: int) -> tuple[Path, dict]:
    """flowerml.data.synthetic's archive for these parameters, cached in `workdir` and generated on
    first use; (its folder, its facts: JPEG count and bytes, archive bytes, generate seconds,
    whether it was cached)."""
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    spec = SyntheticSpec(classes=classes, per_class=per_class, image_size=size,
                         jpeg_quality=quality)
    target = workdir / f"archive-c{classes}-p{per_class}-s{size}-q{quality}"

    def generate(folder: Path) -> dict:
        log(f"generating {spec.num_images} images ({size} px, quality {quality}) into {target}")
        start = time.perf_counter()
        write_synthetic_archive(folder, spec, force=True)
        return {**jpeg_stats(folder / "102flowers.tgz"),
                "generate_seconds": round(time.perf_counter() - start, 2)}

    facts, cached = cached_folder(target, generate)
    if cached:
        log(f"reusing the archive in {target}")
    return target, {**facts, "archive_cached": cached}


def jpeg_stats(archive: Path) -> dict:
    """Number and total bytes of the JPEG members of a tgz, and the tgz's own bytes."""
    count = total = 0
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                count += 1
                total += member.size
    return {"images": count, "image_bytes": total, "archive_bytes": archive.stat().st_size}


def publish_archive(source: Path, store, cache: Path):
    """Ingest the archive in `source` into `store` as `flowerml ingest` does; the dataset."""
    from flowerml.data.ingest import ingest
    from flowerml.data.manifest import resolve_dataset
    from flowerml.data.source_files import FetchOptions

    ingest(str(source), store, DATASET, cache, FetchOptions())
    return resolve_dataset(store, DATASET)


def publish_synthetic(workdir: Path, spec, concurrency: int = 16):
    """Draw `spec`'s archive into workdir/src and publish it into a LocalStore at
    workdir/store through the cache workdir/cache; (store, cache folder, dataset)."""
    from flowerml.data.synthetic import write_synthetic_archive
    from flowerml.io.storage_local import LocalStore

    write_synthetic_archive(workdir / "src", spec, force=True)
    store = LocalStore(workdir / "store", concurrency=concurrency)
    return store, workdir / "cache", publish_archive(workdir / "src", store, workdir / "cache")
