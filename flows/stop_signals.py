"""SIGTERM (systemd, `timeout`, Kubernetes) and Ctrl-C during `flowerml retrain`: raised in the
flow so that it unwinds (its training task stops the child's whole process group on the way
out), then reported as one line and the exit code a shell reports (130, 143)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from flowerml.cli import CliError

if TYPE_CHECKING:
    from prefect.exceptions import TerminationSignal


class Stopped(Exception):
    """SIGTERM or SIGINT reached `flowerml retrain`."""


def stop_on_signals() -> None:
    """Turn SIGTERM/SIGINT into an exception: it unwinds the flow, whose training task stops
    its child's process group on the way out."""
    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def stopped_error(stopped: Stopped | TerminationSignal) -> CliError:
    """The line for a run stopped by `Stopped` or by Prefect's `TerminationSignal`."""
    name = str(stopped) if isinstance(stopped, Stopped) else \
        signal.Signals(stopped.signal).name
    error = CliError(f"stopped by {name}: the flow run is marked crashed and its training "
                     f"child was stopped; the run's checkpoints stay on the store", "stopped")
    error.exit_code = 128 + signal.Signals[name].value  # 143 for SIGTERM, as shells report
    return error
