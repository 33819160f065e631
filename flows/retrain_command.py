"""`flowerml retrain`: the retrain flow run in this process, so that "flows -> tasks ->
flowerml" holds in the code: `flowerml/cli/` never imports a flow, and this command does.

Before anything starts (no Prefect server, no ingest, nothing written), every option is
checked (flows/retrain_options.py, flows/preflight.py): the training config exactly as the
training child will build it, the gate, the store (its credentials must write), dataset,
source and weights, the model name and alias, and the Prefect API when PREFECT_API_URL names
one. A bad value is one `flowerml: error:` line and exit code 2.

While the flow runs, stderr carries what a user follows (flows/run_progress.py): the flow
run's name and id first, one line per training epoch, one per retry, and on failure the error
as the last line. Prefect's own console output (its server, engine logs, tracebacks) shows
with `--verbose`; every log line still reaches the Prefect API either way. SIGTERM and Ctrl-C
stop the flow and the training child's whole process group (flows/stop_signals.py).

Exit codes: 0 promoted, or up to date (nothing trained); 1 finished but not promoted (the
gate refused, as `registry promote`); 2 not done (bad input, unreachable API, failed run), one line says why; 130/143
stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from flowerml.cli import (
    DEVICES,
    Choice,
    CliError,
    alias_option,
    dataset_option,
    emit_json,
    json_option,
    store_option,
    training_options,
)
from flowerml.cli.app import EXIT_REFUSED, FlowermlCommand, one_line
from flowerml.cli.tracking import mlflow_option, tracking_server
from flowerml.core.errors import FlowermlError
from flowerml.core.recipes import RECIPE_NAMES
from flowerml.registry.gates import Gate
from flowerml.settings import load_settings
from flows.local_prefect import prefect_settings, silence_prefect_console, stop_temporary_server
from flows.preflight import (
    check_device,
    check_names,
    check_prefect_api,
    check_source,
    check_store_writable,
    check_weights,
)
from flows.retrain_options import (
    DEMO_CHECKPOINT_EVERY,
    FiniteFloat,
    demo_source,
    validated_params,
)
from flows.retrain_summary import print_retrain_summary
from flows.run_progress import announce_run, show_progress_lines
from flows.stop_signals import Stopped, stop_on_signals, stopped_error


@click.command(cls=FlowermlCommand)
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
@click.option("--checkpoint-every", type=click.IntRange(1, 1000), default=None,
              help=f"Write the resumable checkpoint after every N-th epoch and the last "
                   f"(default 1; {DEMO_CHECKPOINT_EVERY} with --preset demo).")
@click.option("--threshold", type=FiniteFloat(), default=None,
              help=f"Minimum test top-1 (default {Gate.threshold:g}; 0.7 with --preset demo).")
@click.option("--tolerance", type=FiniteFloat(), default=None,
              help=f"Allowed drop below the alias's current model (default {Gate.tolerance:g}).")
@click.option("--class-drop", type=FiniteFloat(), default=None,
              help=f"Largest drop of any class's accuracy below the alias's current model "
                   f"(default {Gate.class_drop:g}).")
@click.option("--force-train", is_flag=True,
              help="Train even when production was trained on this dataset version with this "
                   "config (otherwise the run ends 'Up to date' without training).")
@click.option("--force", is_flag=True, default=None,
              help="Promote regardless of the gate (recorded).")
@click.option("--model-name", default="flowers102", show_default=True,
              help="The registry model to register the candidate under.")
@alias_option
@click.option("--export/--no-export", "export_onnx", default=True, show_default=True,
              help="Export the registered version to ONNX and check its parity with PyTorch "
                   "on the test split before promoting (a failed parity blocks promotion).")
@mlflow_option
@click.option("--verbose", "-v", is_flag=True,
              help="Show Prefect's own output too: its server, engine logs and tracebacks.")
@json_option
def retrain(preset: str | None, source: str | None, store: str | None, dataset: str | None,
            threshold: float | None, tolerance: float | None, class_drop: float | None,
            force: bool | None, force_train: bool, model_name: str, alias: str,
            export_onnx: bool, mlflow_uri: str | None, verbose: bool,
            as_json: bool, **training: Any) -> None:
    """Run the retrain flow: ingest, train, evaluate, register, promote past the gate.

    Reports to PREFECT_API_URL when set; otherwise Prefect runs it with a temporary local
    server. Exit code 0 promoted or up to date (production was trained on this dataset version
    with this config: nothing trained), 1 not promoted, 2 not done (one line says why).
    """
    prefect_settings()
    settings = load_settings(store=store, dataset=dataset, mlflow_uri=mlflow_uri)
    check_names(model_name, alias)
    gate = {"threshold": threshold, "tolerance": tolerance, "class_drop": class_drop,
            "force": force}
    params = validated_params(settings, preset, source, store, dataset, gate, model_name, alias,
                              training).model_copy(update={"export_onnx": export_onnx,
                                                           "force_train": force_train})
    check_source(params, preset, source)
    check_weights(params.training.config())
    check_device(params.training.device)
    check_store_writable(settings)
    check_prefect_api()
    tracking_server(settings)  # an unreachable MLflow server: refused before anything runs
    if preset == "demo" and source is None:
        demo_source(settings.cache_dir)
    if not verbose:
        silence_prefect_console()
        show_progress_lines()
    with tracking_environment(mlflow_uri):
        summary = run_retrain(params)
    if as_json:
        emit_json(summary)
    else:
        print_retrain_summary(summary, model_name, alias, settings)
    if not (summary["promoted"] or summary.get("up_to_date")):
        sys.exit(EXIT_REFUSED)


@contextlib.contextmanager
def tracking_environment(mlflow_uri: str | None) -> Iterator[None]:
    """--mlflow as FLOWERML_MLFLOW_URI while the flow runs: its tasks and training child read
    the settings themselves."""
    if not mlflow_uri:
        yield
        return
    before = os.environ.get("FLOWERML_MLFLOW_URI")
    os.environ["FLOWERML_MLFLOW_URI"] = mlflow_uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLOWERML_MLFLOW_URI", None)
        else:
            os.environ["FLOWERML_MLFLOW_URI"] = before


def run_retrain(params: Any) -> dict[str, Any]:
    """Run the flow; anything that ends it early becomes one line, printed after Prefect's
    temporary server has stopped so that nothing follows it."""
    from prefect.exceptions import TerminationSignal

    from flows.retrain import retrain_flowers  # Prefect: imported once the options pass

    stop_on_signals()
    flow = retrain_flowers.with_options(on_running=[announce_run(params.model_name)])
    try:
        return flow(params)
    except (Stopped, TerminationSignal) as stopped:
        raise stopped_error(stopped) from None
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
