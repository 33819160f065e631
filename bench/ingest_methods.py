"""The two ways the ingest benchmark puts the official split on S3, each timed in a child process
of its own (`bench/ingest.py --method ...`) so that its peak memory is its own.

- flowerml: one `flowerml.data.ingest.ingest(...)` call with a fresh cache: mirror the raw files to
  the store, sha256 and decode-check every image, upload the images straight from the archive
  stream in parallel, then the manifest.
- tutorial: the original notebook's way: extract the tgz, load the .mat files with scipy, open
  and re-save every image through PIL into `<split>/<label-1>/image_NNNNN.jpg`, sequentially
  (`tutorial_prepare`, also the split script of bench/e2e.py's tutorial pipeline), then upload
  every file one by one with boto3's `upload_file`.

The child times the whole method (imports and client set-up excluded) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

from common import DATASET, cpu_seconds, peak_rss_mb
from ingest_targets import s3_client

ARCHIVE_FILES = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
SPLIT_KEYS = {"train": "trnid", "valid": "valid", "test": "tstid"}


def run_flowerml(source: Path, endpoint: str, bucket: str, scratch: Path):
    """The flowerml method, ready to time: a callable that ingests and returns the upload count."""
    from flowerml.data.ingest import ingest
    from flowerml.data.source_files import FetchOptions
    from flowerml.io.storage import S3Options
    from flowerml.io.storage_s3 import S3Store

    store = S3Store(bucket, "", S3Options(endpoint_url=endpoint, addressing_style="path"),
                    concurrency=16)
    cache_dir = scratch / "flowerml-cache"

    def method() -> int:
        result = ingest(str(source), store, DATASET, cache_dir, FetchOptions())
        return result.uploaded

    return method


def tutorial_prepare(source: Path, out_dir: Path) -> None:
    """Extract, read the .mat files, re-save each image through PIL into class folders."""
    import scipy.io
    from PIL import Image

    extracted = out_dir / "extracted"
    with tarfile.open(source / ARCHIVE_FILES[0]) as tar:
        tar.extractall(extracted, filter="data")
    labels = scipy.io.loadmat(source / ARCHIVE_FILES[1])["labels"][0]
    setid = scipy.io.loadmat(source / ARCHIVE_FILES[2])
    for split, key in SPLIT_KEYS.items():
        for image_id in setid[key][0]:
            name = f"image_{int(image_id):05d}.jpg"
            folder = out_dir / "dataset" / split / str(int(labels[image_id - 1]) - 1)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.open(extracted / "jpg" / name)
            image.save(folder / name)  # PIL's default JPEG quality (75): a lossy re-encode


def tutorial_upload(client, bucket: str, root: Path) -> int:
    """Upload every file under root one by one; returns the count."""
    count = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            key = f"{DATASET}/{path.relative_to(root).as_posix()}"
            client.upload_file(str(path), bucket, key)
            count += 1
    return count


def run_tutorial(source: Path, endpoint: str, bucket: str, scratch: Path):
    """The tutorial's method, ready to time: prepare the folders, then upload them."""
    client = s3_client(endpoint)
    out_dir = scratch / "tutorial"

    def method() -> int:
        tutorial_prepare(source, out_dir)
        return tutorial_upload(client, bucket, out_dir / "dataset")

    return method


def timed(method, profile: bool) -> tuple[float, int]:
    """(seconds, uploaded) of one call of method, optionally under cProfile (to stderr)."""
    if not profile:
        start = time.perf_counter()
        uploaded = method()
        return time.perf_counter() - start, uploaded
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    uploaded = profiler.runcall(method)
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return seconds, uploaded


def child_main(args: argparse.Namespace) -> None:
    """Run one method and print {"seconds", "uploaded", "cpu_seconds", "peak_rss_mb"} as one
    JSON line."""
    runner = {"flowerml": run_flowerml, "tutorial": run_tutorial}[args.method]
    method = runner(Path(args.source), args.endpoint, args.bucket, Path(args.scratch))
    cpu_before = cpu_seconds()
    seconds, uploaded = timed(method, args.profile)
    print(json.dumps({"seconds": seconds, "uploaded": uploaded,
                      "cpu_seconds": round(cpu_seconds() - cpu_before, 1),
                      "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
