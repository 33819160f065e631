"""The e2e benchmark's tracer: every process of a traced run loads this file, which times a few
library calls and the process's own start and exit into one trace file.

How. bench/e2e.py writes a `sitecustomize.py` (`write_sitecustomize`) ahead on the traced
command's PYTHONPATH; with FLOWERML_E2E_TRACE set, it loads this file by its path and calls
`install_tracer`, which records the process's start (its kernel start time, from /proc, so
interpreter start-up and imports count) and patches the modules named in `TRACED` as they are
first imported, so that each call appends one line {pid, name, start, end} to the trace. Exit
handlers and the joining of threads at exit are timed as well.

Only the standard library is imported at module level, and nothing of bench/: the file is loaded
by path into processes that know nothing of this folder, and loading it costs nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

TRACE_ENV = "FLOWERML_E2E_TRACE"

# The retrain command's own steps (in flows/cli.py before it was split into
# flows/retrain_command.py and the modules it imports from).
RETRAIN_COMMAND = [("load_settings", "cli.load_settings"),
                   ("validated_params", "cli.validated_params"),
                   ("check_names", "cli.check_names"), ("check_source", "cli.check_source"),
                   ("check_weights", "cli.check_weights"), ("check_device", "cli.check_device"),
                   ("check_prefect_api", "cli.check_prefect_api"),
                   ("demo_source", "cli.demo_source"),
                   ("prefect_console", "cli.prefect_console"),
                   ("silence_prefect_console", "cli.prefect_console"),
                   ("run_retrain", "cli.run_retrain"),
                   ("stop_temporary_server", "cli.stop_temporary_server"),
                   ("print_retrain_summary", "cli.print_summary"),
                   ("emit_json", "cli.print_summary")]

# module -> [(attribute, span name)]; "Class.method" wraps a method. A module is patched right
# after it is first imported, so `from module import name` elsewhere sees the wrapper. A
# function is listed under every module that has held it (a name a module lacks is skipped), so
# that `--baseline` traces code from before a module was split as well as today's.
TRACED: dict[str, list[tuple[str, str]]] = {
    "flows.retrain_command": RETRAIN_COMMAND,
    "flows.cli": RETRAIN_COMMAND,
    "prefect.server.api.server": [("SubprocessASGIServer.start", "prefect.server_start")],
    "prefect.flows": [("Flow.__call__", "prefect.flow")],
    "prefect.tasks": [("Task.__call__", "prefect.task")],
    # A task the flow submits (the export) runs here, on a worker thread, not in __call__.
    "prefect.task_engine": [("run_task_sync", "prefect.task")],
    "tasks.ingest": [("fetch_sources", "lib.fetch_sources"),
                     ("publish_split", "lib.publish_split")],
    "tasks.train": [("run_child", "lib.run_training_child")],
    "flowerml.training.fit": [("fit", "train.fit"), ("resolve_weights", "train.resolve_weights"),
                          ("start_placement", "train.start_placement"),
                          ("resolve_dataset", "train.resolve_dataset"),
                          ("prepare_model", "train.model_build"),
                          # in flowerml/training/fit.py before trainee.py and epoch_loop.py
                          ("build_loaders", "train.build_loaders"),
                          ("train_epoch", "train.epoch_train"),
                          ("evaluate_loader", "train.epoch_valid")],
    "flowerml.training.trainee": [("build_loaders", "train.build_loaders")],
    "flowerml.training.epoch_loop": [("train_epoch", "train.epoch_train"),
                            ("evaluate_loader", "train.epoch_valid")],
    "flowerml.data.loaders": [("sync_split", "data.sync"),
                         ("build_decoded_split", "data.decode_cache")],
    "flowerml.training.runs": [("RunFiles.save_checkpoint", "train.checkpoint"),
                      ("RunFiles.save_weights", "train.save_best")],
    "flowerml.evaluation.inference": [("evaluate_run", "eval.evaluate_run"),
                           ("load_trained_model", "eval.load_model"),
                           ("evaluate_loader", "eval.loop"),
                           ("publish_report", "eval.report")],
    "flowerml.serving.export": [("export_version", "export.export_version"),
                        ("export_onnx", "export.onnx_export"),
                        ("compare_runtimes", "export.parity"),
                        ("export_int8", "export.int8")],
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
            if name == "prefect.task":
                task = args[0] if args else kwargs.get("task")
                label = f"prefect.task:{getattr(task, 'name', '?')}"
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
# Written by bench/e2e_tracer.py: trace this process's library calls when {env} is set.
import os
if os.environ.get({env!r}):
    import importlib.util as _util
    _spec = _util.spec_from_file_location("flowerml_e2e_tracer", {path!r})
    _tracer = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_tracer)
    _tracer.install_tracer()
"""


def write_sitecustomize(folder: Path) -> Path:
    """A sitecustomize.py in `folder` that loads this tracer when the trace variable is set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(env=TRACE_ENV, path=str(Path(__file__).resolve())))
    return folder
