"""Benchmark: `flowerml ingest` against the original tutorial's data preparation.

What it measures. Both methods take the same synthetic Flowers-102 archive (the real file
format, by default at the real scale: 102 classes, ~8,189 JPEGs, long side 500 px, ~40 KB
each) and put the official train/valid/test split on the same S3 endpoint, a moto
`ThreadedMotoServer` on 127.0.0.1 started once by this script, one bucket per method:

- flowerml: one `flowerml.ingest.ingest(...)` call with a fresh cache: mirror the raw files to
  the store, sha256 and decode-check every image, upload the images straight from the archive
  stream in parallel, then the manifest.
- tutorial: the original notebook's way: extract the tgz, load the .mat files with scipy, open
  and re-save every image through PIL into `<split>/<label-1>/image_NNNNN.jpg`, sequentially,
  then upload every file one by one with boto3's `upload_file`.

How. The archive is generated once per parameter set and cached in the work directory (its
generation time is reported, not compared). Each method runs in its own child process (this
script with a hidden `--method` flag) so that its peak resident memory is its own; the moto
server lives in the parent. The child times the whole method (imports and client set-up
excluded) and reports back one JSON line. Peak RSS is the child's `VmHWM` from
/proc/self/status: on Linux `getrusage(RUSAGE_SELF).ru_maxrss` carries the parent's peak across
fork+exec, so with the parent holding moto's objects it would report the parent's memory;
`ru_maxrss` is used only where /proc is missing.

Throughput: images/s is the number of split images over the seconds; MB/s is the archive bytes
of those images (the JPEG members, before any re-encode) over the seconds. MB is 2**20 bytes.
Each method also reports its own CPU seconds and the moto server's (the parent's CPU while that
method ran): on a small machine the server's per-request cost bounds both methods.
Targets: flowerml at least 5x the tutorial's images/s, and flowerml's peak RSS under 500 MB.

Prints exactly one JSON object on stdout; progress goes to stderr.

    python bench/ingest.py                           # the real scale (minutes on 2 cores)
    python bench/ingest.py --images 300 --image-size 200   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MB = 1 << 20
METHODS = ("flowerml", "tutorial")
DATASET = "flowers102"
SPEEDUP_TARGET = 5.0
RSS_TARGET_MB = 500.0
# Quality 87 of the synthetic generator gives ~40 KB per 500 px image, like the real archive.
DEFAULT_JPEG_QUALITY = 87
ARCHIVE_FILES = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
SPLIT_KEYS = {"train": "trnid", "valid": "valid", "test": "tstid"}


def log(message: str) -> None:
    print(f"[bench-ingest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The archive (setup, cached)


def archive_dir(workdir: Path, classes: int, per_class: int, size: int, quality: int) -> Path:
    return workdir / f"archive-c{classes}-p{per_class}-s{size}-q{quality}"


def archive_stats(archive: Path) -> dict:
    """Number and total bytes of the JPEG members of a tgz."""
    count = total = 0
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                count += 1
                total += member.size
    return {"images": count, "image_bytes": total, "archive_bytes": archive.stat().st_size}


def prepare_archive(workdir: Path, classes: int, per_class: int, size: int,
                    quality: int) -> tuple[Path, dict]:
    """The cached archive folder for these parameters, generated on first use; (dir, stats)."""
    target = archive_dir(workdir, classes, per_class, size, quality)
    stats_file = target / "stats.json"
    if stats_file.is_file():
        log(f"reusing the archive in {target}")
        return target, {**json.loads(stats_file.read_text()), "archive_cached": True}

    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    spec = SyntheticSpec(classes=classes, per_class=per_class, image_size=size,
                         jpeg_quality=quality)
    log(f"generating {spec.num_images} images ({size} px, quality {quality}) into {target}")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=workdir))
    try:
        start = time.perf_counter()
        write_synthetic_archive(staging, spec, force=True)
        stats = {**archive_stats(staging / ARCHIVE_FILES[0]),
                 "generate_seconds": round(time.perf_counter() - start, 2)}
        (staging / "stats.json").write_text(json.dumps(stats))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # complete or absent: a half-written archive is never reused
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, {**stats, "archive_cached": False}


# --------------------------------------------------------------------------------------------
# The S3 endpoint (parent only)


def use_dummy_aws_credentials() -> None:
    """moto accepts any credentials; never let a developer's real AWS configuration in."""
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)


def start_moto():
    """A moto S3 server on 127.0.0.1, any free port; (server, endpoint URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    # One access-log line per request would flood stderr and cost the parent CPU mid-timing.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(s3={"addressing_style": "path"}))


# --------------------------------------------------------------------------------------------
# The two methods (each runs in a child process)


def run_flowerml(source: Path, endpoint: str, bucket: str, scratch: Path):
    """The flowerml method, ready to time: a callable that ingests and returns the upload count."""
    from flowerml.ingest import FetchOptions, ingest
    from flowerml.storage import S3Options, S3Store

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


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
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


# --------------------------------------------------------------------------------------------
# The parent: set up, run both children, report


def run_child(method: str, source: Path, endpoint: str, bucket: str, scratch: Path,
              profile: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--method", method,
               "--source", str(source), "--endpoint", endpoint, "--bucket", bucket,
               "--scratch", str(scratch)] + (["--profile"] if profile else [])
    log(f"running {method} ...")
    server_cpu = cpu_seconds()  # the parent only serves S3 meanwhile: this is moto's share
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{method} failed with exit code {done.returncode}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["server_cpu_seconds"] = round(cpu_seconds() - server_cpu, 1)
    log(f"{method}: {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']} MB, "
        f"CPU {report['cpu_seconds']} s + moto {report['server_cpu_seconds']} s")
    return report


def summarise(report: dict, images: int, image_bytes: int) -> dict:
    seconds = report["seconds"]
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "mb_per_s": round(image_bytes / MB / seconds, 2),
        "peak_rss_mb": report["peak_rss_mb"],
        "uploaded": report["uploaded"],
        "cpu_seconds": report["cpu_seconds"],
        "server_cpu_seconds": report["server_cpu_seconds"],
    }


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def compare(source: Path, scratch: Path, profile: bool) -> dict:
    """Start moto, run both methods against it; their raw child reports."""
    use_dummy_aws_credentials()
    server, endpoint = start_moto()
    try:
        client = s3_client(endpoint)
        reports = {}
        for method in METHODS:
            bucket = f"bench-{method}"
            client.create_bucket(Bucket=bucket)
            reports[method] = run_child(method, source, endpoint, bucket, scratch / method,
                                        profile)
        return reports
    finally:
        server.stop()


def parent_main(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    per_class = max(3, math.ceil(args.images / args.classes))
    source, stats = prepare_archive(workdir, args.classes, per_class, args.image_size,
                                    args.jpeg_quality)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        reports = compare(source, scratch, args.profile)
    finally:
        if args.keep:
            log(f"kept the working files in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    images, image_bytes = stats["images"], stats["image_bytes"]
    results = {m: summarise(reports[m], images, image_bytes) for m in METHODS}
    speedup = results["flowerml"]["images_per_s"] / results["tutorial"]["images_per_s"]
    print(json.dumps({
        "images": images,
        "classes": args.classes,
        "image_size": args.image_size,
        "jpeg_quality": args.jpeg_quality,
        "archive_mb": round(stats["archive_bytes"] / MB, 1),
        "image_mb": round(image_bytes / MB, 1),
        "avg_jpeg_kb": round(image_bytes / images / 1024, 1),
        "generate_seconds": stats["generate_seconds"],
        "archive_cached": stats["archive_cached"],
        **results,
        "speedup": round(speedup, 2),
        "targets": {"speedup_5x": speedup >= SPEEDUP_TARGET,
                    "rss_under_500mb": results["flowerml"]["peak_rss_mb"] < RSS_TARGET_MB},
        "rss_measure": "VmHWM of each method's own child process",
        "profiled": args.profile,
        "cpu_count": os.cpu_count(),
        "machine": machine(),
    }))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8189,
                        help="about how many images (rounded up to whole classes)")
    parser.add_argument("--image-size", type=int, default=500, help="longest side in pixels")
    parser.add_argument("--classes", type=int, default=102)
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="quality of the synthetic JPEGs (87: ~40 KB at 500 px)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flowerml-bench"),
                        help="where the archive is cached and the methods write their files")
    parser.add_argument("--keep", action="store_true",
                        help="keep the extracted, re-saved and cached files of this run")
    parser.add_argument("--profile", action="store_true",
                        help="run each method under cProfile and print its hotspots to stderr")
    # The child side: run one method and report it (set by the parent only).
    for flag in ("--method", "--source", "--endpoint", "--bucket", "--scratch"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.method:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
