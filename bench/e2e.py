"""Benchmark: where the wall time of a retrain goes, trigger to decision, stage by stage.

What it measures. One `flowerml retrain` (the console script `make demo` runs: the CLI, Prefect
with a temporary local server, the training child, evaluation, the gate, registration, the ONNX
export) on a synthetic archive in the official format, from the moment the command is started
to its exit, cut into stages:

    CLI start (interpreter + imports), option checks, Prefect start (its temporary server),
    fetch, publish, training-child start (interpreter + imports), model build, split sync,
    decode cache, each epoch's training, validation and checkpoint, test evaluation, decide,
    register, export (ONNX and its parity check), promote, Prefect's own time between the
    tasks, Prefect's stop, the summary and the process's exit.

The trigger-to-decision time ends when the gate's last task (promote, else decide) ends; the
overhead is the wall time less the epochs' training and validation (checkpoints count as
overhead). The JSON also lists every process's start (and its interpreter's start-up) and the
installed distributions the run imported (what a machine needs to run it).

How. Nothing in flowerml is changed to be measured: every process the command starts (the CLI,
Prefect's server, the training child) loads a `sitecustomize` written by this script, which
wraps a few library functions (`fit`'s steps, `sync_split`, `build_decoded_split`,
`train_epoch`, `evaluate_loader`, the Prefect task calls, the temporary server's start, ...)
so that each call appends one line {pid, name, start, end} to a trace file. A process's start
is its kernel start time (/proc), so interpreter start-up and imports are measured too; exit
handlers and the joining of threads at exit are timed as well. The stages are read off the
trace afterwards: the CLI's timeline from trigger to exit is cut by what the run waits for at
each instant (a task, the server's start, the checks, ...), so work done in the background
while the run waits on something else is not counted twice; the training task is cut by the
training child's own spans.

Cases (`--case`):
- `cpu` (default): ResNet-18 at 112 px, 2 epochs, the default recipe's optimiser and
  augmentation, `--weights none` (no ImageNet download offline), gate threshold 0 so the
  promotion path runs too; and, in the same run, the original tutorial's pipeline on the same
  data and model (its split script re-saving every JPEG, ImageFolder with its PIL transforms,
  fp32, Adam, batch 48, num_workers 0): one epoch of train + valid and part of the test split
  timed, its full run (40 epochs) extrapolated, and also at flowerml's epoch count.
- `gpu`: the default recipe (ResNet-152, 224 px, its full schedule) on CUDA, and the
  tutorial's pipeline with the same model at 224 px.
- `demo`: `flowerml retrain --preset demo` as `make demo` runs it (a fresh working folder,
  so its synthetic archive is drawn, ingested, synced and decoded); with `--baseline REF` the
  same command from the code of git commit REF (with `--baseline-paths`, only those files
  from REF and the rest from the working tree), the candidate first, then the baseline,
  `--repeat` times, alternating, to measure a cut against its baseline in one run. Its
  figure: the overhead (target: at most 45 s), with each stage's median.

The archive. `--scale 1` is the real archive's size: 102 classes, 8,189 JPEGs with a long side
of 500 px (~40 KB each), the official split sizes 1,020 / 1,020 / 6,149 (every class in every
split). `--scale s` keeps the 102 classes and multiplies every split by s (at least one image
per class and split). The archive is drawn once per (scale, size, quality) with flowerml's own
flower generator, on all cores, and cached in the work folder; its drawing is not timed.
Every retrain starts from a fresh store and cache (a cold run: everything is uploaded, synced
and decoded); Prefect's database under the work folder is created once, untimed, before the
first timed run, as a user's first `make demo` would otherwise pay once.

Prints exactly one JSON object on stdout (also written to `--out`); `--chart` draws the stages
as a stacked bar chart (matplotlib). Progress goes to stderr.

    python bench/e2e.py --scale 0.25                         # the CPU case, a quarter scale
    python bench/e2e.py --case demo --baseline HEAD~1 --baseline-paths flows/cli.py --repeat 2
    python bench/e2e.py --case gpu --out gpu-e2e.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRACE_ENV = "FLOWERML_E2E_TRACE"
CLASSES = 102
OFFICIAL_SPLIT = {"train": 1020, "valid": 1020, "test": 6149}
TUTORIAL_EPOCHS = 40
TUTORIAL_BATCH = 48
JPEG_SIZE = 500
JPEG_QUALITY = 87  # ~40 KB per 500 px synthetic image, like the real archive
DEMO_OVERHEAD_TARGET_S = 45.0


def log(message: str) -> None:
    print(f"[bench-e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================================================
# The tracer: loaded by every process of a traced run through a generated sitecustomize.py.
# Only the standard library is imported at module level, so loading it costs nothing.

# module -> [(attribute, span name)]; "Class.method" wraps a method. A module is patched right
# after it is first imported, so `from module import name` elsewhere sees the wrapper.
TRACED: dict[str, list[tuple[str, str]]] = {
    "flows.cli": [("load_settings", "cli.load_settings"),
                  ("validated_params", "cli.validated_params"),
                  ("check_names", "cli.check_names"), ("check_source", "cli.check_source"),
                  ("check_weights", "cli.check_weights"), ("check_device", "cli.check_device"),
                  ("check_prefect_api", "cli.check_prefect_api"),
                  ("demo_source", "cli.demo_source"), ("prefect_console", "cli.prefect_console"),
                  ("run_retrain", "cli.run_retrain"),
                  ("stop_temporary_server", "cli.stop_temporary_server"),
                  ("print_retrain_summary", "cli.print_summary"),
                  ("emit_json", "cli.print_summary")],
    "prefect.server.api.server": [("SubprocessASGIServer.start", "prefect.server_start")],
    "prefect.flows": [("Flow.__call__", "prefect.flow")],
    "prefect.tasks": [("Task.__call__", "prefect.task")],
    "tasks.ingest": [("fetch_sources", "lib.fetch_sources"),
                     ("publish_split", "lib.publish_split")],
    "tasks.train": [("run_child", "lib.run_training_child")],
    "flowerml.training": [("fit", "train.fit"), ("resolve_weights", "train.resolve_weights"),
                          ("start_placement", "train.start_placement"),
                          ("resolve_dataset", "train.resolve_dataset"),
                          ("prepare_model", "train.model_build")],
    "flowerml.trainee": [("build_loaders", "train.build_loaders")],
    "flowerml.epoch_loop": [("train_epoch", "train.epoch_train"),
                            ("evaluate_loader", "train.epoch_valid")],
    "flowerml.loaders": [("sync_split", "data.sync"),
                         ("build_decoded_split", "data.decode_cache")],
    "flowerml.runs": [("RunFiles.save_checkpoint", "train.checkpoint"),
                      ("RunFiles.save_weights", "train.save_best")],
    "flowerml.inference": [("evaluate_run", "eval.evaluate_run"),
                           ("load_trained_model", "eval.load_model"),
                           ("evaluate_loader", "eval.loop"),
                           ("publish_report", "eval.report")],
    "flowerml.export": [("export_version", "export.export_version"),
                        ("export_onnx", "export.onnx_export"),
                        ("measure_parity", "export.parity")],
}


class _Trace:
    """Appends one JSON line per finished span to the trace file (O_APPEND: whole lines)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def record(self, name: str, start: float, end: float, **extra: object) -> None:
        line = json.dumps({"pid": os.getpid(), "name": name, "start": start, "end": end,
                           **extra}) + "\n"
        os.write(self.fd, line.encode())


def process_start_time() -> float:
    """This process's start as a Unix time, from /proc (10 ms resolution)."""
    with open("/proc/self/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        since_boot = float(uptime.read().split()[0])
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


def _wrap(trace: _Trace, function: Callable, name: str) -> Callable:
    import functools

    @functools.wraps(function)
    def traced(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            label = name
            if name == "prefect.task" and args:
                label = f"prefect.task:{getattr(args[0], 'name', '?')}"
            trace.record(label, start, time.time())

    traced.__flowerml_e2e__ = True
    return traced


def _patch(trace: _Trace, module) -> None:
    for attribute, name in TRACED.get(module.__name__, ()):
        owner, _, leaf = attribute.rpartition(".")
        target = getattr(module, owner) if owner else module
        function = getattr(target, leaf, None)
        if function is None:
            continue
        # A name imported from a module traced earlier is already wrapped: trace it here
        # under this module's own name instead.
        function = getattr(function, "__wrapped__", function) \
            if getattr(function, "__flowerml_e2e__", False) else function
        setattr(target, leaf, _wrap(trace, function, name))


def install_tracer() -> None:
    """Record this process's start and patch the traced modules as they are imported."""
    import importlib.abc
    import importlib.util

    trace = _Trace(os.environ[TRACE_ENV])
    ready = time.time()
    with open("/proc/self/cmdline", "rb") as cmdline:
        argv = [part.decode(errors="replace") for part in cmdline.read().split(b"\0") if part]
    trace.record("process.interpreter", process_start_time(), ready, argv=argv[:8])

    class PatchingFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in TRACED:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    execute = spec.loader.exec_module

                    def exec_module(module, execute=execute):
                        start = time.time()
                        execute(module)
                        trace.record(f"import.{module.__name__}", start, time.time())
                        _patch(trace, module)

                    spec.loader.exec_module = exec_module
                    return spec
            return None

    sys.meta_path.insert(0, PatchingFinder())
    trace_exit(trace)


def trace_exit(trace: _Trace) -> None:
    """Time what a process does after its main code: joining its threads, then each exit
    handler (registered after this, so all but the interpreter's own); and record which
    top-level modules it imported (what a machine needs installed to run it)."""
    import atexit
    import threading

    atexit.register(lambda: trace.record(
        "process.modules", time.time(), time.time(),
        modules=sorted({name.partition(".")[0] for name in list(sys.modules)
                        if not name.startswith("_")})))

    register, unregister = atexit.register, atexit.unregister
    handlers: dict[int, list] = {}

    def traced_unregister(function):
        for handler in handlers.pop(id(function), []):
            unregister(handler)
        unregister(function)

    def traced_register(function, *args, **kwargs):
        name = getattr(function, "__qualname__", repr(function))
        module = getattr(function, "__module__", "") or ""

        def handler():
            start = time.time()
            try:
                function(*args, **kwargs)
            finally:
                trace.record(f"exit.handler:{module}.{name}", start, time.time())

        handlers.setdefault(id(function), []).append(handler)
        register(handler)
        return function

    atexit.register, atexit.unregister = traced_register, traced_unregister
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        def traced_shutdown():
            start = time.time()
            waiting = [t.name for t in threading.enumerate()
                       if t is not threading.main_thread() and not t.daemon and t.is_alive()]
            try:
                shutdown()
            finally:
                trace.record("exit.join_threads", start, time.time(), threads=waiting)

        threading._shutdown = traced_shutdown


SITECUSTOMIZE = """\
# Written by bench/e2e.py: trace this process's library calls when {env} is set.
import os
if os.environ.get({env!r}):
    import importlib.util as _util
    _spec = _util.spec_from_file_location("flowerml_e2e_tracer", {path!r})
    _tracer = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_tracer)
    _tracer.install_tracer()
"""


def write_sitecustomize(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(env=TRACE_ENV, path=str(Path(__file__).resolve())))
    return folder


# ============================================================================================
# The archive: the official format and split sizes, drawn by flowerml's generator


def split_sizes(scale: float) -> dict[str, int]:
    """Images per split at `scale` (1: the official 1,020 / 1,020 / 6,149)."""
    return {split: max(CLASSES, round(count * scale)) for split, count in OFFICIAL_SPLIT.items()}


def _draw(job: tuple[int, int, int, int, int]) -> bytes:
    import numpy as np

    from flowerml.synthetic import draw_flower, encode_jpeg, image_dimensions

    image_id, label, size, quality, seed = job
    rng = np.random.default_rng([seed, 3, image_id])  # flowerml.synthetic's image stream
    width, height = image_dimensions(size, rng)
    return encode_jpeg(draw_flower(label, rng, width, height), quality)


def write_official_archive(folder: Path, sizes: dict[str, int], size: int, quality: int,
                           seed: int = 0) -> None:
    """102flowers.tgz, imagelabels.mat and setid.mat with exactly `sizes` images per split,
    classes spread evenly over each split, image ids shuffled across splits."""
    import multiprocessing

    import numpy as np

    from flowerml.flowers import image_name
    from flowerml.synthetic import SYNTHETIC_MARKER, mat_bytes, write_tgz

    rng = np.random.default_rng([seed, 2])
    labels_by_split = {split: (np.arange(count) % CLASSES) + 1 for split, count in sizes.items()}
    total = sum(sizes.values())
    ids = rng.permutation(total) + 1  # image id of the i-th entry of the concatenated splits
    labels = np.zeros(total, dtype=np.uint8)
    setid: dict[str, np.ndarray] = {}
    offset = 0
    for split, key in (("train", "trnid"), ("valid", "valid"), ("test", "tstid")):
        count = sizes[split]
        chosen = ids[offset:offset + count]
        labels[chosen - 1] = labels_by_split[split]
        setid[key] = np.sort(chosen).astype(np.uint16)[np.newaxis, :]
        offset += count
    jobs = [(image_id, int(labels[image_id - 1]), size, quality, seed)
            for image_id in range(1, total + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool, \
            open(folder / "102flowers.tgz", "wb") as handle:
        images = pool.imap(_draw, jobs, chunksize=16)
        write_tgz(handle, ((f"jpg/{image_name(i)}", data)
                           for i, data in zip(range(1, total + 1), images, strict=True)))
    marker = (f"synthetic Flowers-102 archive in the official split sizes {sizes} drawn by "
              f"bench/e2e.py with flowerml.synthetic's generator (image_size={size} "
              f"jpeg_quality={quality} seed={seed}); its images are not photographs")
    (folder / "imagelabels.mat").write_bytes(mat_bytes({"labels": labels[np.newaxis, :],
                                                        SYNTHETIC_MARKER: marker}))
    (folder / "setid.mat").write_bytes(mat_bytes(setid))


def prepare_archive(workdir: Path, scale: float, size: int, quality: int) -> tuple[Path, dict]:
    """The cached archive folder for these parameters, drawn on first use; (folder, facts)."""
    sizes = split_sizes(scale)
    target = workdir / f"archive-{sizes['train']}-{sizes['valid']}-{sizes['test']}-s{size}-q{quality}"
    facts_file = target / "facts.json"
    if facts_file.is_file():
        log(f"reusing the archive in {target}")
        return target, {**json.loads(facts_file.read_text()), "archive_cached": True}
    log(f"drawing {sum(sizes.values())} images ({size} px) into {target} (untimed)")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=workdir))
    try:
        started = time.perf_counter()
        write_official_archive(staging, sizes, size, quality)
        facts = {"splits": sizes, "images": sum(sizes.values()), "jpeg_side": size,
                 "jpeg_quality": quality,
                 "archive_mb": round((staging / "102flowers.tgz").stat().st_size / 2**20, 1),
                 "draw_seconds": round(time.perf_counter() - started, 1)}
        (staging / "facts.json").write_text(json.dumps(facts))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # whole or absent: a half-drawn archive is never reused
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, {**facts, "archive_cached": False}


# ============================================================================================
# One traced command


def clean_environment() -> dict[str, str]:
    """This process's environment without any flowerml, Prefect API or AWS setting: a traced
    run uses only what the case sets."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("FLOWERML_", "PREFECT_", "AWS_"))}


def python_path(*first: Path) -> str:
    """PYTHONPATH with `first` ahead of what it held (where extra packages may live)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*(str(p) for p in first), *rest])


def console_script() -> list[str]:
    """The `flowerml` console script `make demo` runs (the venv's), as a command."""
    script = Path(sys.executable).parent / "flowerml"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def run_traced(command: list[str], *, cwd: Path, code_root: Path, env: dict[str, str],
               timeout: float) -> dict:
    """Run `command` with every process traced; its wall time, outputs and trace events."""
    sitedir = write_sitecustomize(cwd / ".e2e-site")
    trace = cwd / "trace.jsonl"
    trace.unlink(missing_ok=True)
    env = {**clean_environment(), **env, TRACE_ENV: str(trace),
           "PYTHONPATH": python_path(sitedir, code_root)}
    # Files, not pipes: the command has ended when its process exits (as a shell sees it),
    # not when the last process that inherited its output closes it.
    with open(cwd / "stdout.txt", "w+") as stdout, open(cwd / "stderr.txt", "w+") as stderr:
        started = time.time()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                   text=True)
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
        ended = time.time()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    events = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    return {"trigger": started, "exit": ended, "returncode": returncode,
            "stdout": out, "stderr": err, "events": events}


def warm_prefect_database(prefect_home: Path) -> None:
    """Create Prefect's database once, untimed (a user pays this on the very first run only)."""
    if any(prefect_home.glob("*.db")):
        return
    log(f"creating Prefect's database in {prefect_home} (untimed, once)")
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**clean_environment(), "PREFECT_HOME": str(prefect_home)}
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ============================================================================================
# From a trace to stages


def process_of(events: list[dict], word: str) -> int | None:
    """The pid of the first traced process whose command line holds `word`."""
    for event in events:
        if event["name"] == "process.interpreter" and word in event.get("argv", []):
            return event["pid"]
    return None


def spans(events: list[dict], name: str, pid: int | None = None,
          within: tuple[float, float] | None = None) -> list[dict]:
    found = [e for e in events if e["name"] == name and (pid is None or e["pid"] == pid)
             and (within is None or within[0] <= e["start"] and e["end"] <= within[1])]
    return sorted(found, key=lambda e: e["start"])


def first(events: list[dict], name: str, pid: int | None = None,
          within: tuple[float, float] | None = None) -> dict | None:
    found = spans(events, name, pid, within)
    return found[0] if found else None


def length(span: dict | None) -> float:
    return span["end"] - span["start"] if span else 0.0


def total(found: Iterable[dict]) -> float:
    return sum(length(span) for span in found)


def r(seconds: float) -> float:
    return round(seconds, 2)


TASK_STAGES = {"fetch-sources": "fetch", "publish-split": "publish", "train": "train",
               "evaluate": "test evaluation", "decide-promotion": "decide",
               "register-model": "register", "export-onnx": "export",
               "promote-model": "promote"}


# The order stages are listed (and stacked) in: the run's own order, Prefect's share last.
STAGE_ORDER = ["CLI start", "option checks", "before the flow", "demo archive", "Prefect start",
               "fetch", "publish", "train", "test evaluation", "decide", "register", "export",
               "promote", "Prefect between tasks", "Prefect stop", "summary and exit"]


def training_stages(events: list[dict], task: dict, child: int | None) -> list[dict]:
    """The training task cut into: child start, setup, sync, decode, model, each epoch, exit."""
    inside = (task["start"], task["end"])
    run = first(events, "lib.run_training_child", within=inside)
    fit = first(events, "train.fit", child)
    interpreter = first(events, "process.interpreter", child)
    if not (run and fit and interpreter):
        return [{"stage": "train", "seconds": r(length(task))}]
    fit_range = (fit["start"], fit["end"])
    epochs = spans(events, "train.epoch_train", child, fit_range)
    valids = spans(events, "train.epoch_valid", child, fit_range)
    checkpoints = spans(events, "train.checkpoint", child, fit_range)
    bests = spans(events, "train.save_best", child, fit_range)
    model = total(spans(events, "train.model_build", child, fit_range))
    sync = total(spans(events, "data.sync", child, fit_range))
    decode = total(spans(events, "data.decode_cache", child, fit_range))
    loop_start = epochs[0]["start"] if epochs else fit["end"]
    stages = [
        {"stage": "training child start", "seconds": r(interpreter["end"] - run["start"]),
         "detail": {"python start": r(length(interpreter)),
                    "before the child": r(interpreter["start"] - run["start"])}},
        {"stage": "training child imports", "seconds": r(fit["start"] - interpreter["end"]),
         "detail": {"note": "torch, torchvision, flowerml and the CLI, until fit() starts"}},
        {"stage": "model build", "seconds": r(model)},
        {"stage": "sync", "seconds": r(sync)},
        {"stage": "decode cache", "seconds": r(decode)},
        {"stage": "training setup", "seconds": r(loop_start - fit["start"] - model - sync - decode),
         "detail": {"weights": r(total(spans(events, "train.resolve_weights", child))),
                    "placement": r(total(spans(events, "train.start_placement", child))),
                    "dataset manifest": r(total(spans(events, "train.resolve_dataset",
                                                      child)))}},
    ]
    for index, epoch in enumerate(epochs):
        after = epochs[index + 1]["start"] if index + 1 < len(epochs) else fit["end"]
        between = (epoch["end"], after)
        valid = total(spans(events, "train.epoch_valid", child, between))
        stages.append({"stage": f"epoch {index + 1} train", "seconds": r(length(epoch)),
                       "epoch": index + 1, "kind": "train"})
        stages.append({"stage": f"epoch {index + 1} valid", "seconds": r(valid),
                       "epoch": index + 1, "kind": "valid"})
        stages.append({"stage": f"epoch {index + 1} checkpoint",
                       "seconds": r(after - epoch["end"] - valid), "epoch": index + 1,
                       "kind": "checkpoint",
                       "detail": {"checkpoint": r(total(spans(events, "train.checkpoint",
                                                              child, between))),
                                  "best weights": r(total(spans(events, "train.save_best",
                                                                child, between)))}})
    del valids, checkpoints, bests
    stages.append({"stage": "training child exit", "seconds": r(run["end"] - fit["end"])})
    stages.append({"stage": "train task (Prefect)", "seconds": r(length(task) - length(run)),
                   "detail": {"note": "the progress artifact and log lines around the child"}})
    return stages


def task_detail(events: list[dict], stage: str, task: dict, cli: int) -> dict:
    inside = (task["start"], task["end"])

    def part(name: str) -> float:
        return r(total(spans(events, name, cli, inside)))

    if stage == "test evaluation":
        return {"load model": part("eval.load_model"), "sync": part("data.sync"),
                "decode cache": part("data.decode_cache"), "evaluation loop": part("eval.loop"),
                "report": part("eval.report")}
    if stage == "export":
        return {"onnx export": part("export.onnx_export"), "parity": part("export.parity")}
    if stage == "fetch":
        return {"library": part("lib.fetch_sources")}
    if stage == "publish":
        return {"library": part("lib.publish_split")}
    return {}


def attribute(start: float, end: float, labelled: list[tuple[str, float, float]],
              fallback: Callable[[float], str]) -> dict[str, float]:
    """Seconds of [start, end] per label: each instant goes to the first of `labelled` (label,
    from, to) that covers it, else to `fallback(instant)`; labels in order of first use."""
    cuts = sorted({start, end, *(t for _l, a, b in labelled for t in (a, b) if start < t < end)})
    seconds: dict[str, float] = {}
    for a, b in itertools.pairwise(cuts):
        middle = (a + b) / 2
        label = next((name for name, lo, hi in labelled if lo <= middle <= hi), None)
        label = label or fallback(middle)
        seconds[label] = seconds.get(label, 0.0) + (b - a)
    return seconds


def stage_table(run: dict) -> dict:
    """The stages of one traced retrain, in time order, summing to its wall time.

    The CLI's timeline from trigger to exit is cut by what it is waiting for at each instant
    (a task, the demo archive, Prefect's server start, the option checks, ...), so work done
    in the background while the run waits on something else is not counted twice."""
    events, t0, t_exit = run["events"], run["trigger"], run["exit"]
    cli = process_of(events, "retrain")
    child = process_of(events, "--exit-with-parent")
    interpreter = first(events, "process.interpreter", cli)
    checks = [e for e in events if e["pid"] == cli and e["name"].startswith("cli.")
              and e["name"] not in ("cli.run_retrain", "cli.stop_temporary_server",
                                    "cli.print_summary", "cli.demo_source",
                                    "cli.prefect_console")]
    flow = first(events, "prefect.flow", cli)
    run_retrain = first(events, "cli.run_retrain", cli)
    if not (interpreter and checks and flow and run_retrain):
        raise RuntimeError("the trace misses the CLI's main spans: did the command start?")
    checks_start = min(e["start"] for e in checks)
    tasks = sorted((e for e in events if e["pid"] == cli and e["name"].startswith("prefect.task:")),
                   key=lambda e: e["start"])
    server = first(events, "prefect.server_start", cli)
    labelled = [(TASK_STAGES.get(t["name"].removeprefix("prefect.task:"),
                                 t["name"].removeprefix("prefect.task:")), t["start"], t["end"])
                for t in tasks]
    labelled.append(("CLI start", t0, checks_start))
    labelled += [("option checks", e["start"], e["end"]) for e in checks]
    labelled += [("demo archive", e["start"], e["end"])
                 for e in spans(events, "cli.demo_source", cli)]
    if server:
        labelled.append(("Prefect start", server["start"], server["end"]))
    # Importing Prefect's server module (FastAPI, SQLAlchemy, ...) comes first in its start.
    labelled += [("Prefect start", e["start"], e["end"])
                 for e in spans(events, "import.prefect.server.api.server", cli)]
    labelled += [("Prefect stop", e["start"], e["end"])
                 for e in spans(events, "cli.stop_temporary_server", cli)]

    def fallback(instant: float) -> str:
        if instant < flow["start"]:
            return "before the flow"
        if instant <= flow["end"]:
            return "Prefect between tasks"
        return "Prefect stop" if instant <= run_retrain["end"] else "summary and exit"

    seconds = attribute(t0, t_exit, labelled, fallback)
    uvicorn = first(events, "process.interpreter", process_of(events, "uvicorn"))
    details = {
        "CLI start": {"python start": r(interpreter["end"] - t0),
                      "imports": r(checks_start - interpreter["end"])},
        "option checks": {e["name"].removeprefix("cli."): r(length(e)) for e in checks},
        "before the flow": {"note": "what the run waits for before the flow starts and "
                                    "outside the stages around it"},
        "Prefect start": {
            "note": "the temporary local server (0 with PREFECT_API_URL), as far as the run "
                    "waits for it",
            "whole start": r(length(server)),
            "importing its module here": r(total(spans(events, "import.prefect.server.api.server",
                                                       cli))),
            "before its process starts": r(uvicorn["start"] - server["start"])
            if uvicorn and server else None,
            "its process until healthy": r(server["end"] - uvicorn["start"])
            if uvicorn and server else None},
        "Prefect between tasks": {"note": "the flow's engine: run records, states, results"},
        "summary and exit": exit_detail(events, cli, run_retrain["end"]),
    }
    stages: list[dict] = []
    order = [*STAGE_ORDER, *(label for label in seconds if label not in STAGE_ORDER)]
    for label in (label for label in order if label in seconds):
        value = seconds[label]
        task = next((t for t in tasks if TASK_STAGES.get(t["name"].removeprefix(
            "prefect.task:")) == label), None)
        if label == "train" and task:
            stages.extend(training_stages(events, task, child))
            continue
        detail = task_detail(events, label, task, cli) if task else details.get(label)
        stages.append({"stage": label, "seconds": r(value), **({"detail": detail}
                                                                 if detail else {})})
    decision = max((t["end"] for t in tasks if t["name"].endswith(
        (":decide-promotion", ":promote-model"))), default=flow["end"])
    wall = t_exit - t0
    epochs = [s for s in stages if "epoch" in s]
    training = sum(s["seconds"] for s in epochs if s["kind"] in ("train", "valid"))
    return {"wall_seconds": r(wall), "stages": stages,
            "unaccounted_seconds": r(wall - sum(s["seconds"] for s in stages)),
            "trigger_to_decision_seconds": r(decision - t0),
            "epochs": sum(1 for s in epochs if s["kind"] == "train"),
            "epoch_seconds": r(training),
            "checkpoint_seconds": r(sum(s["seconds"] for s in epochs
                                        if s["kind"] == "checkpoint")),
            "overhead_seconds": r(wall - training),
            "processes": process_summary(events, t0),
            "imported_distributions": imported_distributions(events)}


def exit_detail(events: list[dict], cli: int, after: float) -> dict:
    """What the CLI does once the flow is over: the summary, its threads, its exit handlers."""
    late = (after, float("inf"))
    handlers = [e for e in events if e["pid"] == cli and e["name"].startswith("exit.handler:")]
    slowest = sorted(handlers, key=length, reverse=True)[:4]
    return {"print summary": r(total(spans(events, "cli.print_summary", cli, late))),
            "join threads": r(total(spans(events, "exit.join_threads", cli, late))),
            "threads joined": sorted({name for e in spans(events, "exit.join_threads", cli, late)
                                      for name in e.get("threads", [])}),
            "exit handlers": r(total(handlers)),
            "slowest handlers": {e["name"].removeprefix("exit.handler:"): r(length(e))
                                 for e in slowest}}


def imported_distributions(events: list[dict]) -> list[str]:
    """The installed distributions (name==version) whose modules any traced process imported."""
    import importlib.metadata

    modules = {m for e in events if e["name"] == "process.modules" for m in e["modules"]}
    owners = importlib.metadata.packages_distributions()
    names = {dist for module in modules for dist in owners.get(module, ())}
    found = []
    for name in sorted(names, key=str.lower):
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def process_summary(events: list[dict], t0: float) -> list[dict]:
    """Every traced process: its command, when it started and how long its interpreter took."""
    rows = []
    for event in events:
        if event["name"] == "process.interpreter":
            argv = event.get("argv", [])
            rows.append({"command": " ".join(Path(argv[0]).name if i == 0 else a
                                             for i, a in enumerate(argv[:4])),
                         "started_at": r(event["start"] - t0),
                         "python_start_seconds": r(length(event))})
    return rows


# ============================================================================================
# The tutorial's pipeline (its own child process, so its imports are timed as a user pays them)


def tutorial_child(params: dict) -> dict:
    """Time the tutorial's pipeline: imports, its split script, its loaders and model, one
    epoch of training and validation, and the first `test_images` of its test evaluation."""
    started = process_start_time()
    timings: dict[str, float] = {}
    mark = time.time()

    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from bench.ingest import tutorial_prepare
    from flowerml.transforms import tutorial_transform

    timings["python start and imports"] = time.time() - started
    device = torch.device(params["device"])
    source, out_dir = Path(params["source"]), Path(params["scratch"])

    mark = time.time()
    tutorial_prepare(source, out_dir)  # extract, read the .mat files, re-save every JPEG
    timings["split script"] = time.time() - mark

    mark = time.time()
    size = params["image_size"]
    folders = {split: torchvision.datasets.ImageFolder(
        str(out_dir / "dataset" / split), tutorial_transform(size, train=split == "train"))
        for split in ("train", "valid", "test")}
    loaders = {split: DataLoader(data, batch_size=TUTORIAL_BATCH, shuffle=True, num_workers=0)
               for split, data in folders.items()}
    model = getattr(torchvision.models, params["arch"])(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, CLASSES)  # the new head; nothing frozen
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    timings["loaders and model build"] = time.time() - mark

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mark = time.time()
    model.train()
    for inputs, labels in loaders["train"]:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
    synchronise()
    timings["epoch train"] = time.time() - mark

    def evaluate(loader, limit: int | None) -> tuple[float, int]:
        model.eval()
        seen, begun = 0, time.time()
        with torch.no_grad():
            for inputs, labels in loader:
                criterion(model(inputs.to(device)), labels.to(device))
                seen += len(labels)
                if limit is not None and seen >= limit:
                    break  # before the loader decodes a batch that would not be counted
        synchronise()
        return time.time() - begun, seen

    timings["epoch valid"], _ = evaluate(loaders["valid"], None)
    test_seconds, test_seen = evaluate(loaders["test"], params["test_images"])
    return {"seconds": {k: r(v) for k, v in timings.items()},
            "test_timed": {"images": test_seen, "seconds": r(test_seconds)},
            "images": {split: len(data) for split, data in folders.items()}}


def run_tutorial(archive: Path, scratch: Path, *, arch: str, image_size: int, device: str,
                 test_images: int, epochs_full: int, epochs_same: int) -> dict:
    """The tutorial's timings (measured) and its whole run extrapolated."""
    params = {"source": str(archive), "scratch": str(scratch), "arch": arch,
              "image_size": image_size, "device": device, "test_images": test_images}
    log(f"tutorial pipeline: {arch} at {image_size} px on {device}, one epoch ...")
    env = {**clean_environment(), "PYTHONPATH": python_path(REPO)}
    started = time.time()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--tutorial-child",
                           json.dumps(params)], env=env, stdout=subprocess.PIPE, text=True,
                          check=True)
    wall = time.time() - started
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    seconds, test = measured["seconds"], measured["test_timed"]
    test_full = test["seconds"] / max(test["images"], 1) * measured["images"]["test"]
    fixed = (seconds["python start and imports"] + seconds["split script"]
             + seconds["loaders and model build"])
    per_epoch = seconds["epoch train"] + seconds["epoch valid"]

    def whole_run(epochs: int) -> dict:
        return {"epochs": epochs, "seconds": r(fixed + epochs * per_epoch + test_full),
                "stages": [{"stage": k, "seconds": v} for k, v in seconds.items()
                           if not k.startswith("epoch")]
                + [{"stage": "epochs train", "seconds": r(epochs * seconds["epoch train"])},
                   {"stage": "epochs valid", "seconds": r(epochs * seconds["epoch valid"])},
                   {"stage": "test evaluation", "seconds": r(test_full)}]}

    log(f"tutorial: one epoch {per_epoch:.1f} s (train {seconds['epoch train']:.1f} s), "
        f"split script {seconds['split script']:.1f} s")
    return {"measured": measured, "measured_wall_seconds": r(wall),
            "setup": {"arch": arch, "image_size": image_size, "device": device,
                      "batch_size": TUTORIAL_BATCH, "num_workers": 0, "precision": "fp32",
                      "optimizer": "Adam lr 1e-3",
                      "loop": "per epoch: train over the train split, then evaluate valid; "
                              "test once at the end (the notebook iterated its test loader "
                              "in the training loop, which would be ~6x slower per epoch)"},
            "extrapolated_full_run": whole_run(epochs_full),
            "extrapolated_same_epochs": whole_run(epochs_same)}


# ============================================================================================
# The cases


CASES = {
    "cpu": {"arch": "resnet18", "image_size": 112, "epochs": 2, "device": "cpu"},
    "gpu": {"arch": "resnet152", "image_size": 224, "epochs": None, "device": "cuda"},
}


def retrain_command(case: str, archive: Path | None, args: argparse.Namespace) -> list[str]:
    if case == "demo":
        extra = ["--epochs", str(args.epochs)] if args.epochs else []
        return [*console_script(), "retrain", "--preset", "demo", *extra]
    setup = CASES[case]
    command = [*console_script(), "retrain", "--source", str(archive), "--recipe", "default",
               "--arch", setup["arch"], "--image-size", str(setup["image_size"]),
               "--weights", "none", "--device", setup["device"], "--threshold", "0", "--json"]
    epochs = args.epochs or setup["epochs"]
    if epochs:
        command += ["--epochs", str(epochs)]
    return command


def one_retrain(case: str, label: str, code_root: Path, archive: Path | None, workdir: Path,
                args: argparse.Namespace) -> dict:
    """One cold, traced retrain in a fresh folder (fresh store and cache); its stage table."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    folder = Path(tempfile.mkdtemp(prefix=f"{case}-{slug}-", dir=workdir))
    command = retrain_command(case, archive, args)
    log(f"{label}: {' '.join(command[1:])} (in {folder})")
    load_before = os.getloadavg()
    run = run_traced(command, cwd=folder, code_root=code_root, timeout=args.timeout,
                     env={"PREFECT_HOME": str(workdir / "prefect-home")})
    if run["returncode"] not in (0, 1):
        tail = "\n".join(run["stderr"].splitlines()[-15:])
        raise SystemExit(f"{label} failed with exit code {run['returncode']}:\n{tail}")
    table = stage_table(run)
    table.update({"label": label, "code": str(code_root), "returncode": run["returncode"],
                  "loadavg_before": [round(x, 2) for x in load_before],
                  "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
    summary = run["stdout"].strip().splitlines()
    if case != "demo" and summary:
        outcome = json.loads(summary[-1])
        table["outcome"] = {"promoted": outcome.get("promoted"),
                            "test_top1": outcome.get("metrics", {}).get("top1"),
                            "test_images": outcome.get("metrics", {}).get("n")}
    log(f"{label}: {table['wall_seconds']:.1f} s in all, epochs {table['epoch_seconds']:.1f} s,"
        f" overhead {table['overhead_seconds']:.1f} s")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return table


CODE_FOLDERS = ("flowerml", "tasks", "flows")


def baseline_code(workdir: Path, ref: str, paths: list[str]) -> Path:
    """The code to compare against, in a fresh folder: the files of git commit `ref`
    (flowerml, tasks, flows); with `paths`, today's working tree with only those files as
    they were at `ref` (so that other changes in the tree are in both runs)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"code-{commit[:12]}-", dir=workdir))
    if paths:
        for folder in CODE_FOLDERS:
            shutil.copytree(REPO / folder, target / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit,
                              *(paths or CODE_FOLDERS)], stdout=subprocess.PIPE,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def demo_case(workdir: Path, args: argparse.Namespace) -> dict:
    codes = [("candidate", REPO)]
    if args.baseline:
        codes.append((f"baseline {args.baseline}",
                      baseline_code(workdir, args.baseline, args.baseline_paths)))
    runs: list[dict] = []
    for repeat in range(args.repeat):
        for label, root in codes:
            runs.append(one_retrain("demo", label, root, None, workdir, args) | {"repeat": repeat})
    result: dict = {"runs": runs, "medians": {}}
    for label, _root in codes:
        mine = [run for run in runs if run["label"] == label]
        result["medians"][label] = {
            key: r(median([run[key] for run in mine]))
            for key in ("wall_seconds", "epoch_seconds", "overhead_seconds")}
        result["medians"][label]["stages"] = median_stages(mine)
    candidate = result["medians"]["candidate"]["overhead_seconds"]
    result["target"] = {"overhead_at_most_s": DEMO_OVERHEAD_TARGET_S,
                        "met": candidate <= DEMO_OVERHEAD_TARGET_S}
    if args.baseline:
        base = result["medians"][f"baseline {args.baseline}"]["overhead_seconds"]
        result["overhead_cut_seconds"] = r(base - candidate)
    return result


def median_stages(runs: list[dict]) -> list[dict]:
    """Each stage's median seconds over runs (stages in the first run's order)."""
    names = [s["stage"] for s in runs[0]["stages"]]
    return [{"stage": name, "seconds": r(median([next((s["seconds"] for s in run["stages"]
                                                     if s["stage"] == name), 0.0)
                                               for run in runs]))} for name in names]


def training_case(case: str, workdir: Path, args: argparse.Namespace) -> dict:
    archive, facts = prepare_archive(workdir, args.scale, args.jpeg_size, args.jpeg_quality)
    setup = CASES[case]
    flowerml = one_retrain(case, "flowerml", REPO, archive, workdir, args)
    result: dict = {"archive": facts, "setup": {**setup, "epochs": args.epochs or setup["epochs"]
                                                 or 30, "recipe": "default", "weights": "none"},
                    "flowerml": flowerml}
    if args.tutorial:
        scratch = Path(tempfile.mkdtemp(prefix="tutorial-", dir=workdir))
        try:
            epochs = result["setup"]["epochs"]
            result["tutorial"] = run_tutorial(
                archive, scratch, arch=setup["arch"], image_size=setup["image_size"],
                device=setup["device"], test_images=args.tutorial_test_images,
                epochs_full=TUTORIAL_EPOCHS, epochs_same=epochs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        full = result["tutorial"]["extrapolated_full_run"]["seconds"]
        same = result["tutorial"]["extrapolated_same_epochs"]["seconds"]
        result["speedup"] = {"vs_tutorial_full_run": r(full / flowerml["wall_seconds"]),
                             "vs_tutorial_same_epochs": r(same / flowerml["wall_seconds"])}
    return result


# ============================================================================================
# The chart


CATEGORIES = [  # (category, colour, stage names or prefixes)
    ("start-up and imports", "#9e9e9e", ("CLI start", "training child start",
                                         "training child imports", "python start and imports",
                                         "before the flow", "summary and exit",
                                         "training child exit")),
    ("option checks", "#bdbdbd", ("option checks",)),
    ("Prefect", "#7e57c2", ("Prefect start", "Prefect between tasks", "Prefect stop",
                            "train task (Prefect)")),
    ("data: fetch, publish, split", "#26a69a", ("fetch", "publish", "split script",
                                                "demo archive")),
    ("data: sync and decode cache", "#80cbc4", ("sync", "decode cache")),
    ("model build and setup", "#ffb74d", ("model build", "training setup",
                                          "loaders and model build")),
    ("training epochs", "#e53935", ("epoch", "epochs train")),
    ("validation (per epoch)", "#ef9a9a", ("valid",)),
    ("checkpoints (per epoch)", "#b71c1c", ("checkpoint",)),
    ("test evaluation", "#42a5f5", ("test evaluation",)),
    ("decide, register, promote", "#8d6e63", ("decide", "register", "promote")),
    ("ONNX export and parity", "#fdd835", ("export",)),
]


def category_of(stage: str) -> str:
    if stage.startswith("epoch") and stage.endswith("valid") or stage == "epochs valid":
        return "validation (per epoch)"
    if stage.startswith("epoch") and stage.endswith("checkpoint"):
        return "checkpoints (per epoch)"
    for name, _colour, members in CATEGORIES:
        if stage in members or any(stage.startswith(m + " ") for m in members):
            return name
    return "start-up and imports"


def by_category(stages: list[dict]) -> dict[str, float]:
    sums = {name: 0.0 for name, _colour, _members in CATEGORIES}
    for stage in stages:
        sums[category_of(stage["stage"])] += max(stage["seconds"], 0.0)
    return sums


def draw_chart(bars: list[tuple[str, list[dict]]], title: str, path: Path) -> None:
    """A horizontal stacked bar per (label, stages), coloured by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.9 + 0.8 * len(bars)))
    labels = [label for label, _stages in bars]
    for index, (_label, stages) in enumerate(bars):
        left = 0.0
        for name, colour, _members in CATEGORIES:
            seconds = by_category(stages)[name]
            if seconds <= 0:
                continue
            ax.barh(index, seconds, left=left, color=colour, edgecolor="white",
                    label=name if index == 0 or name not in ax.get_legend_handles_labels()[1]
                    else None)
            if seconds >= 0.06 * max(sum(by_category(s).values()) for _l, s in bars):
                ax.text(left + seconds / 2, index, f"{seconds:.0f}", ha="center", va="center",
                        fontsize=8)
            left += seconds
        ax.text(left, index, f"  {left:.0f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.3),
              ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_bars(case: str, result: dict) -> list[tuple[str, list[dict]]]:
    if case == "demo":
        runs = {label: sum(1 for run in result["runs"] if run["label"] == label)
                for label in result["medians"]}
        return [(f"{label}\n(median of {runs[label]})", medians["stages"])
                for label, medians in result["medians"].items()]
    epochs = result["flowerml"]["epochs"]
    bars = [(f"flowerml retrain, {epochs} epochs\n(measured)", result["flowerml"]["stages"])]
    if "tutorial" in result:
        same = result["tutorial"]["extrapolated_same_epochs"]
        full = result["tutorial"]["extrapolated_full_run"]
        # Its own 40 epochs would dwarf the rest: named, not drawn.
        bars.append((f"tutorial, {same['epochs']} epochs (1 measured)\n(its {full['epochs']} "
                     f"epochs: {full['seconds']:,.0f} s)", same["stages"]))
    return bars


# ============================================================================================
# Main


def chart_title(args: argparse.Namespace, report: dict) -> str:
    where = report["machine"].get("gpu") or f"{os.cpu_count()} CPU cores"
    if args.case == "demo":
        epochs = f", {args.epochs} epochs" if args.epochs else ""
        return f"flowerml retrain --preset demo{epochs}: where the wall time goes ({where})"
    return (f"flowerml retrain, {args.case} case at scale {args.scale:g}: where the wall time "
            f"goes ({where})")


def machine() -> dict:
    facts = {"platform": platform.platform(), "python": platform.python_version(),
             "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("cpu", "gpu", "demo"), default="cpu")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="archive size as a fraction of the real one (1: 8,189 images)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (cpu: 2; gpu: the default recipe's 30)")
    parser.add_argument("--jpeg-size", type=int, default=JPEG_SIZE)
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY)
    parser.add_argument("--no-tutorial", dest="tutorial", action="store_false",
                        help="skip the tutorial's pipeline")
    parser.add_argument("--tutorial-test-images", type=int, default=960,
                        help="test images the tutorial's evaluation is timed on (the rest "
                             "extrapolated)")
    parser.add_argument("--baseline", default=None,
                        help="demo: also run the command from this git commit's code")
    parser.add_argument("--baseline-paths", nargs="*", default=[],
                        help="demo: take only these files from --baseline, the rest from the "
                             "working tree")
    parser.add_argument("--repeat", type=int, default=1, help="demo: runs per code version")
    parser.add_argument("--timeout", type=float, default=3 * 3600,
                        help="seconds before a retrain is stopped")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flowerml-e2e"),
                        help="where the archive, Prefect's database and the runs live")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--chart", default=None, help="draw the stacked bar chart (PNG) here")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--tutorial-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tutorial_child:
        print(json.dumps(tutorial_child(json.loads(args.tutorial_child))), flush=True)
        return
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    warm_prefect_database(workdir / "prefect-home")
    load_before = os.getloadavg()
    started = time.time()
    if args.case == "demo":
        result = demo_case(workdir, args)
    else:
        result = training_case(args.case, workdir, args)
    report = {"case": args.case, "scale": args.scale if args.case != "demo" else None,
              **result, "bench_seconds": r(time.time() - started),
              "loadavg_start": [round(x, 2) for x in load_before],
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.chart:
        title = chart_title(args, report)
        draw_chart(chart_bars(args.case, result), title, Path(args.chart))
    print(text)


if __name__ == "__main__":
    main()
