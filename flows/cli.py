"""The `flowerml` console script: the library's commands plus `flowerml retrain` (and, from
flows/cli_cluster.py, `flowerml score --dask-address` and `flowerml pools`).

`retrain` runs the retrain flow in this process, so "flows -> tasks -> flowerml" holds in the
code: `flowerml/cli/` never imports a flow, and this module adds the command that does.

Before anything starts (no Prefect server, no ingest, nothing written), every option is
checked: the training config exactly as the training child will build it, the gate, the
store (its credentials must write: a probe object under `_probe/`, deleted at once), dataset,
source and weights (a local file must load as a state dict that fits the arch), the model name
and alias, and the Prefect API when PREFECT_API_URL names one. A bad value is one `flowerml: error:` line and exit code 2.

While the flow runs, stderr carries what a user follows: the flow run's name and id first,
one line per training epoch, one per retry, and on failure the error as the last line.
Prefect's own console output (its server, engine logs, tracebacks) shows with `--verbose`;
every log line still reaches the Prefect API either way. SIGTERM (systemd, `timeout`,
Kubernetes) and Ctrl-C stop the flow and the training child's whole process group, and the
command exits within seconds with one line saying so.

Exit codes: 0 promoted; 1 finished but not promoted (the gate refused, as `registry
promote`); 2 not done (bad input, unreachable API, failed run), one line says why; 130/143
stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flowerml.cli import (
    DEVICES,
    Choice,
    CliError,
    alias_option,
    cli,
    dataset_option,
    emit_json,
    json_option,
    store_option,
    training_options,
)
from flowerml.cli.app import EXIT_REFUSED, one_line
from flowerml.errors import FlowermlError
from flowerml.gates import Gate
from flowerml.recipes import RECIPE_NAMES, TrainConfig, option_name
from flowerml.settings import Settings, load_settings
from flows import cli_cluster  # noqa: F401  (adds `score --dask-address` and `pools`)
from flows.worker import build_worker_command

DEMO_SPEC = {"classes": 10, "per_class": 30, "image_size": 96, "seed": 0}
DEMO_THRESHOLD = 0.7
PREFECT_API_TIMEOUT_S = 5.0

if TYPE_CHECKING:
    from pydantic import ValidationError


def demo_source_folder(cache_dir: Path) -> Path:
    return cache_dir / "demo-source"


def demo_source(cache_dir: Path) -> Path:
    """The demo's synthetic archive, written once into the cache."""
    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    folder = demo_source_folder(cache_dir)
    if not (folder / "setid.mat").is_file():
        write_synthetic_archive(folder, SyntheticSpec(**DEMO_SPEC), force=True)
    return folder


def retrain_params(preset: str | None, source: str | None, store: str | None,
                   dataset: str | None, gate: dict[str, Any], model_name: str, alias: str,
                   cache_dir: Path, training: dict[str, Any]) -> dict[str, Any]:
    """The flow's parameters from the command line, the demo preset filling the gaps (its
    source is the folder `demo_source` writes, named here before anything is written)."""
    training = {k: v for k, v in training.items() if v is not None}
    gate = {k: v for k, v in gate.items() if v is not None}
    if preset == "demo":
        source = source or str(demo_source_folder(cache_dir))
        training = {"recipe": "demo", **training}
        gate = {"threshold": DEMO_THRESHOLD, **gate}
    params: dict[str, Any] = {"source": source or "official", "training": training,
                              "gate": gate, "model_name": model_name, "alias": alias}
    if store:
        params["store"] = store
    if dataset:
        params["dataset"] = dataset
    return params


# --------------------------------------------------------------------------------------------
# Checks before anything starts


class FiniteFloat(click.ParamType):
    """A float that is a number: click's FLOAT takes "nan" and "inf", which every bound
    check then lets through or misreports."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        option = param.opts[0] if param else "value"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CliError(f"{option} must be a number: got {value!r}") from None
        if not math.isfinite(number):
            raise CliError(f"{option} must be a finite number: got {value!r}")
        return number


# How the flow's parameter fields are spelled on the command line.
PARAMETER_OPTIONS = {("gate", "threshold"): "--threshold", ("gate", "tolerance"): "--tolerance",
                     ("gate", "class_drop"): "--class-drop",
                     ("gate", "force"): "--force", ("source",): "--source",
                     ("dataset",): "--dataset", ("store",): "--store",
                     ("model_name",): "--model-name", ("alias",): "--alias"}
BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
          "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}


def describe_option_error(error: ValidationError) -> str:
    """A refusal of the flow's parameters (a pydantic ValidationError) as one line naming the
    option the user typed, the way `flowerml train` names it."""
    first = error.errors(include_url=False)[0]
    loc = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return message  # the training config's own check: it names the option already
    # A field's own location may end in the name of its type ("constrained-int").
    option = PARAMETER_OPTIONS.get(loc[:2]) or PARAMETER_OPTIONS.get(loc[:1]) or (
        option_name(loc[1]) if loc[:1] == ("training",) and len(loc) > 1
        else "retrain parameter " + ".".join(loc))
    value = first.get("input")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{option} must be a finite number (got {value})"
    bound = BOUNDS.get(first["type"])
    if bound:
        return f"{option} must be {bound[1]} {first['ctx'][bound[0]]:g} (got {value!r})"
    return f"{option}: {message} (got {value!r})"


def validated_params(settings: Settings, preset: str | None, source: str | None,
                     store: str | None, dataset: str | None, gate: dict[str, Any],
                     model_name: str, alias: str, training: dict[str, Any]) -> Any:
    """The flow's parameters, validated as the flow validates them: the training part builds
    the `TrainConfig` through the recipe exactly as the training child receives it."""
    from pydantic import ValidationError

    from flows.retrain import RetrainParams

    try:
        return RetrainParams.model_validate(retrain_params(
            preset, source, store, dataset, gate, model_name, alias, settings.cache_dir,
            training))
    except ValidationError as error:
        raise CliError(describe_option_error(error)) from None


def check_names(model_name: str, alias: str) -> None:
    from flowerml.registry_names import check_name

    check_name(model_name)
    check_name(alias, "alias")


def check_source(params: Any, preset: str | None, source: str | None) -> None:
    """The source's form, and a local one an existing folder (the demo's is written later)."""
    from flowerml.ingest import resolve_source

    if preset == "demo" and source is None:
        return
    resolve_source(params.source)


def check_weights(config: TrainConfig) -> None:
    """`--weights` as far as it can be checked without downloading (`flowerml.weights.
    check_weights_value`): a known form, and a local file that is a regular file, loads as a
    state dict weights-only and fits the arch's backbone. `imagenet` and s3:// files are
    fetched, and checked the same way, by the training child."""
    if config.weights.strip().lower() in ("none", "imagenet"):
        return  # no torch import for the common case
    from flowerml.weights import check_weights_value  # torch: only for a file the user named

    check_weights_value(config.weights, config.arch)


def check_store_writable(settings: Settings) -> None:
    """The store takes writes with these credentials (`Store.check_writable`: a create-only
    probe object under `_probe/`, deleted at once): a read-only key is refused here, not at the
    first upload after the ingest's and the training's work."""
    from flowerml.settings import build_store

    build_store(settings).check_writable()  # a local store not made yet is not made here


def check_device(device: str) -> None:
    if device == "cuda":
        from flowerml.distributed import select_device  # torch: only when CUDA is asked for

        select_device(device)


def check_prefect_api() -> None:
    """When PREFECT_API_URL (or the Prefect profile) names a server, it must answer now: one
    line naming the URL and the cause, instead of a minute of retried connection errors."""
    import httpx
    from prefect.settings import get_current_settings

    from flowerml.download import redact_url, url_problem
    from flowerml.storage_s3 import connection_failure

    api = get_current_settings().api
    if not api.url:
        return  # ephemeral mode: the flow starts a temporary local server
    shown = redact_url(api.url)
    problem = url_problem(api.url)
    if problem:
        raise CliError(f"PREFECT_API_URL {shown} {problem}")
    headers = {"Authorization": f"Bearer {api.key.get_secret_value()}"} if api.key else {}
    try:
        response = httpx.get(api.url.rstrip("/") + "/health", headers=headers,
                             timeout=PREFECT_API_TIMEOUT_S)
    except httpx.TimeoutException:
        cause = f"no answer within {PREFECT_API_TIMEOUT_S:g} s"
    except httpx.HTTPError as error:
        cause = connection_failure(error, httpx.URL(api.url).host)
    else:
        if response.status_code == 200:
            return
        raise CliError(f"Prefect API {shown} (PREFECT_API_URL) answered HTTP "
                       f"{response.status_code} to GET /health: is it a Prefect server's API "
                       f"URL (http://HOST:4200/api)?",
                       "unavailable" if response.status_code >= 500 else "bad-input")
    raise CliError(f"Prefect API {shown} (PREFECT_API_URL) is unreachable: {cause}; start "
                   f"that server, correct the URL, or unset PREFECT_API_URL to run with a "
                   f"temporary local server", "unavailable")


# --------------------------------------------------------------------------------------------
# What the run shows


def prefect_settings() -> None:
    """Prefect settings of our own, unless the user set them; before Prefect is imported, which
    reads them once."""
    # The temporary server gets 20 s to start by default, which a busy 2-core machine can miss.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's telemetry heartbeat races its own writes to SQLite and logs a
    # "database is locked" traceback on every run (and calls home from a CLI run).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def prefect_console(verbose: bool) -> None:
    """Prefect's console output in this process and in the temporary server it starts: all of
    it with --verbose, none otherwise (the API still receives every log line).

    Prefect read its settings when it was imported: this only reaches the temporary server
    (its own process, started by the run) and this process's logging handlers.
    """
    if verbose:
        return
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"  # the server process
    os.environ["PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL"] = "CRITICAL"
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if type(handler).__module__.startswith("prefect.logging") and \
                    isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL + 1)
    logging.getLogger("prefect.task_runs").addHandler(ProgressLines())


EPOCH_LOG = "epoch %s/%s: %s"  # tasks/train.py's log line for an epoch event


class ProgressLines(logging.Handler):
    """The task-run log records a person follows, as `flowerml:` lines on stderr: one per
    training epoch (as `flowerml train` prints it) and one per retry."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = progress_line(record)
        except Exception:  # noqa: BLE001 - a log line must never fail the run
            self.handleError(record)
            return
        if line:
            click.echo(f"flowerml: {line}", err=True)


def progress_line(record: logging.LogRecord) -> str | None:
    """An epoch line (tasks/train.py logs `epoch %s/%s: <event JSON>`) or a retry notice."""
    message = record.getMessage()
    if record.msg == EPOCH_LOG and isinstance(record.args, tuple) and len(record.args) == 3:
        from flowerml.progress import EpochReport

        try:
            event = json.loads(record.args[2])
            return EpochReport(int(record.args[0]), int(record.args[1]), event["train_loss"],
                               event["train_top1"], event["valid_top1"],
                               event["seconds"]).line()
        except (ValueError, KeyError, TypeError):  # another event shape: show it as it is
            return message
    if message.startswith("Task run failed with") and " - Retry " in message:
        return f"{getattr(record, 'task_run_name', 'task')}: {one_line(message)}"
    return None


def announce_run(model_name: str) -> Any:
    """A flow hook printing the run's name and ids as it starts: what to look up in the UI,
    and the training run that holds its checkpoints, known before any work. It also starts
    importing what the later tasks need (`import_task_modules`): not sooner, where it would
    compete for the CPU with Prefect's temporary server starting."""
    from flows.retrain import training_run_id

    def flow_run_started(_flow: Any, flow_run: Any, _state: Any) -> None:
        click.echo(f"flowerml: flow run '{flow_run.name}' ({flow_run.id}); training run "
                   f"{training_run_id(model_name, flow_run.id)}", err=True)
        in_background("flowerml-imports", import_task_modules)

    return flow_run_started


def stop_temporary_server() -> None:
    """Stop Prefect's temporary server now (it would stop at exit, logging after our last
    line), once this process's log lines have reached it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return  # a real server: not ours to stop
    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)
    SubprocessASGIServer().stop()


# --------------------------------------------------------------------------------------------
# Ready sooner: what the run will import, imported in the background

# What the flow's later tasks import in this process (evaluation, the gate, registration, the
# ONNX export): torch, torchvision and ONNX take seconds of CPU to import, which the run would
# otherwise spend after training, in series; imported while the training child runs (this
# process only waits for it then), they are ready when evaluation starts.
TASK_MODULES = ("flowerml.inference", "flowerml.evaluation", "flowerml.promotion",
                "flowerml.release", "flowerml.export", "onnx", "onnxruntime",
                "matplotlib.figure", "matplotlib.backends.backend_agg")


def in_background(name: str, work: Callable[[], object]) -> threading.Thread:
    """`work` on a daemon thread. A failure there is not reported: the run meets it again
    (and reports it) when it does the same work itself."""
    def run() -> None:
        with contextlib.suppress(Exception):
            work()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def import_task_modules() -> None:
    for name in TASK_MODULES:
        importlib.import_module(name)


# --------------------------------------------------------------------------------------------
# The command


class Stopped(Exception):
    """SIGTERM or SIGINT reached `flowerml retrain`."""


def stop_on_signals() -> None:
    """Turn SIGTERM/SIGINT into an exception: it unwinds the flow, whose training task stops
    its child's process group on the way out."""
    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


@cli.command()
@click.option("--preset", type=Choice(("demo",)), default=None,
              help="demo: a synthetic archive, a small CPU model, a 0.7 gate.")
@click.option("--source", default=None,
              help="Where the three Flowers-102 files come from: official (default), a "
                   "folder, file://PATH, s3://bucket[/prefix] or an http(s) base URL.")
@store_option
@dataset_option
@click.option("--recipe", type=Choice(RECIPE_NAMES), default=None,
              help="A named training config; the options below override it.")
@training_options
@click.option("--device", type=Choice(DEVICES), default=None,
              help="Where training runs (default: auto, CUDA when present).")
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="DataLoader workers (default: one per CPU core).")
@click.option("--nproc-per-node", type=click.IntRange(1, 16), default=None,
              help="GPUs (torchrun) for training (default 1).")
@click.option("--timeout-s", type=FiniteFloat(), default=None,
              help="Stop a training attempt after this many seconds (default 7200).")
@click.option("--threshold", type=FiniteFloat(), default=None,
              help=f"Minimum test top-1 (default {Gate.threshold:g}; 0.7 with --preset demo).")
@click.option("--tolerance", type=FiniteFloat(), default=None,
              help=f"Allowed drop below the alias's current model (default {Gate.tolerance:g}).")
@click.option("--class-drop", type=FiniteFloat(), default=None,
              help=f"Largest drop of any class's accuracy below the alias's current model "
                   f"(default {Gate.class_drop:g}).")
@click.option("--force", is_flag=True, default=None,
              help="Promote regardless of the gate (recorded).")
@click.option("--model-name", default="flowers102", show_default=True,
              help="The registry model to register the candidate under.")
@alias_option
@click.option("--export/--no-export", "export_onnx", default=True, show_default=True,
              help="Export the registered version to ONNX and check its parity with PyTorch "
                   "on the test split before promoting (a failed parity blocks promotion).")
@click.option("--verbose", "-v", is_flag=True,
              help="Show Prefect's own output too: its server, engine logs and tracebacks.")
@json_option
def retrain(preset: str | None, source: str | None, store: str | None, dataset: str | None,
            threshold: float | None, tolerance: float | None, class_drop: float | None,
            force: bool | None, model_name: str, alias: str, export_onnx: bool, verbose: bool,
            as_json: bool, **training: Any) -> None:
    """Run the retrain flow: ingest, train, evaluate, register, promote past the gate.

    Reports to PREFECT_API_URL when set; otherwise Prefect runs it with a temporary local
    server. Exit code 0 promoted, 1 not promoted, 2 not done (one line says why).
    """
    prefect_settings()
    settings = load_settings(store=store, dataset=dataset)
    check_names(model_name, alias)
    gate = {"threshold": threshold, "tolerance": tolerance, "class_drop": class_drop,
            "force": force}
    params = validated_params(settings, preset, source, store, dataset, gate, model_name, alias,
                              training).model_copy(update={"export_onnx": export_onnx})
    check_source(params, preset, source)
    check_weights(params.training.config())
    check_device(params.training.device)
    check_store_writable(settings)
    check_prefect_api()
    if preset == "demo" and source is None:
        demo_source(settings.cache_dir)
    prefect_console(verbose)
    summary = run_retrain(params)
    if as_json:
        emit_json(summary)
    else:
        print_retrain_summary(summary, model_name, alias, settings)
    if not summary["promoted"]:
        sys.exit(EXIT_REFUSED)


def run_retrain(params: Any) -> dict[str, Any]:
    """Run the flow; anything that ends it early becomes one line, printed after Prefect's
    temporary server has stopped so that nothing follows it."""
    from prefect.exceptions import TerminationSignal

    from flows.retrain import retrain_flowers

    stop_on_signals()
    flow = retrain_flowers.with_options(on_running=[announce_run(params.model_name)])
    try:
        return flow(params)
    except (Stopped, TerminationSignal) as stopped:
        name = str(stopped) if isinstance(stopped, Stopped) else \
            signal.Signals(stopped.signal).name
        error = CliError(f"stopped by {name}: the flow run is marked crashed and its training "
                         f"child was stopped; the run's checkpoints stay on the store", "stopped")
        error.exit_code = 128 + signal.Signals[name].value  # 143 for SIGTERM, as shells report
        raise error from None
    except FlowermlError:
        raise
    except Exception as error:  # noqa: BLE001 - Prefect's and the API's errors alike
        raise CliError(f"retrain failed: {type(error).__name__}: {one_line(error)} "
                       f"(--verbose shows Prefect's logs and traceback)", "failed") from None
    finally:
        # Tidying up must not replace the run's own outcome; at worst Prefect stops its
        # server at exit, as it would have anyway.
        with contextlib.suppress(Exception):
            stop_temporary_server()


def print_retrain_summary(summary: dict, model_name: str, alias: str,
                          settings: Settings) -> None:
    metrics = summary["metrics"]
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    click.echo(f"{verdict}: {model_name} version {summary['version']} "
               f"(run {summary['run_id']}, dataset {summary['dataset_version']})")
    click.echo(f"test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, "
               f"mean per-class {metrics['mean_class_accuracy']:.4f} on {metrics['n']} images")
    for reason in summary["reasons"]:
        click.echo(f"  - {reason}")
    if summary.get("export"):
        click.echo(f"onnx: {describe_export(summary['export'])}")
    image = example_image(settings, summary["run_id"], summary["dataset_version"])
    # A version that was not promoted is not behind the alias: name it by number.
    model = f"{model_name}@{alias}" if summary["promoted"] else \
        f"{model_name}:{summary['version']}"
    click.echo(f"try: flowerml predict {image} --model {model}")


def example_image(settings: Settings, run_id: str, dataset_version: str) -> Path:
    """A test image of the run's dataset version in the local cache, one the model classified
    right when its stored test predictions say so (a first try that shows the wrong flower
    looks like a broken model), else the first there is."""
    folder = settings.cache_dir / settings.dataset / dataset_version
    with contextlib.suppress(FlowermlError, OSError):
        from flowerml.comparison import run_predictions
        from flowerml.settings import build_store

        rows = run_predictions(build_store(settings), run_id).images
        for row in rows:
            if row.correct and (folder / row.key).is_file():
                return folder / row.key
    examples = sorted(folder.glob("test/*/*.jpg"))
    return examples[0] if examples else Path("path/to/flower.jpg")


def describe_export(export: dict[str, Any]) -> str:
    verdict = "passed" if export["parity_passed"] else "FAILED"
    return (f"{export['location']} ({export['bytes'] / 1e6:.1f} MB), parity {verdict}: top-1 "
            f"agreement {export['top1_agreement']:.2%}, max |logit diff| "
            f"{export['max_abs_logit_diff']:.1e}")


cli.add_command(build_worker_command())  # `flowerml worker`: drains on SIGTERM


def main(argv: list[str] | None = None) -> None:
    """The console script. Called with `argv`, it raises SystemExit as click does. Called
    without, it is the process's entry point and ends the process itself (`end_process`)."""
    if argv is not None:
        cli.main(args=argv, prog_name="flowerml")
        return
    try:
        cli.main(prog_name="flowerml")
    except SystemExit as done:
        end_process(done.code)
        raise
    end_process(0)  # a command that succeeds returns (flowerml's group exits only otherwise)


def end_process(code: object) -> None:
    """Exit with `code` as Python would, less its teardown of every module and object, which
    takes seconds once torch, Prefect and ONNX are loaded (measured by bench/e2e.py as
    "summary and exit"): output is flushed and the exit handlers run first. Returns (and lets
    Python exit as usual) while a non-daemon thread still runs, since Python would wait for
    it."""
    main_thread = threading.main_thread()
    if any(thread is not main_thread and not thread.daemon and thread.is_alive()
           for thread in threading.enumerate()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")  # what Python does with a non-numeric exit code
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers Python would run at exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
