"""Prefect inside `flowerml retrain`'s own process: the settings we default, its console output
(all of it with --verbose, none otherwise: the API still receives every log line), and the
stop of the temporary server Prefect starts when PREFECT_API_URL is unset.

Prefect's public API only: settings through the environment, as Prefect documents them, the
standard library's logging handlers, the temporary server's own class. The one exception is
named where it is made (`send_queued_events`)."""

from __future__ import annotations

import logging
import os


def prefect_settings() -> None:
    """Prefect settings of our own, unless the user set them; before Prefect is imported, which
    reads them once."""
    # The temporary server gets 20 s to start by default, which a busy 2-core machine can miss.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's telemetry heartbeat races its own writes to SQLite and logs a
    # "database is locked" traceback on every run (and calls home from a CLI run).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def log_handlers() -> list[logging.Handler]:
    """Every handler of every logger in this process, once each (the standard library
    lists its loggers only in `Logger.manager.loggerDict`, which it does not document)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return list(dict.fromkeys(handler for logger in loggers
                              for handler in getattr(logger, "handlers", ())))


def silence_prefect_console() -> None:
    """No Prefect output on the console, in this process and in the temporary server it starts.

    Prefect read its settings when it was imported: the environment only reaches the temporary
    server (its own process, started by the run); this process's handlers are set here."""
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"  # the server process
    os.environ["PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL"] = "CRITICAL"
    for handler in log_handlers():
        # By module rather than class: the debug handler's class is private to Prefect.
        if type(handler).__module__.startswith("prefect.logging") and \
                isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL + 1)


def stop_temporary_server() -> None:
    """Stop Prefect's temporary server now (it would stop at exit, logging after our last
    line), once this process's log lines and events have reached it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return  # a real server: not ours to stop
    for handler in log_handlers():
        if isinstance(handler, APILogHandler):
            handler.flush()  # sends the log lines it queued, waiting up to 5 s
    send_queued_events()
    SubprocessASGIServer().stop()  # without a port: the one `get_client` started


def send_queued_events() -> None:
    """Send the events this process queued (state changes, our own) before the server stops.

    Prefect 3.9 has no public call for it: `prefect.events` exports `emit_event` and its
    clients, no flush; `prefect.testing.utilities.prefect_test_harness` does this same call.
    `drain_all` is the public class's method, defined in `prefect._internal.concurrency`."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=5)
