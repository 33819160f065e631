"""The `flowerml` command group and what every subcommand shares: errors, options, JSON output.

Bad input (any `FlowermlError`, a click usage error, an outage that outlived its retries) is
printed as one line on stderr, `flowerml: error: ...`, with exit code 2. With `--json` anywhere
on the command line, stdout holds only JSON: a failure adds `{"error": ..., "kind": ...}` as its
last line, `kind` being the error's category (`flowerml.core.errors.FlowermlError.kind`). Bugs keep
their traceback on stderr (and, with `--json`, a `kind: internal` line on stdout).

Exit codes: 0 done; 1 done, but the verdict is negative (a gate refused, some inputs failed);
2 not done, one line says why; 130/143 stopped by SIGINT/SIGTERM; 141 stdout was closed.

A closed stdout (`flowerml predict DIR | head -2`: the reader has what it wanted and left) ends
the command quietly, as a Unix tool killed by SIGPIPE ends: no message, no traceback, and the
status a shell reports for it, 141 (128 + SIGPIPE), so `set -o pipefail` scripts see the output
was cut short, as they would for `cat` or `grep`.

SIGTERM (systemd, `timeout`, Kubernetes, a launcher stopping its child) stops a command the way
Ctrl-C does: it is raised in the main thread as `StoppedBySignal`, so every `finally` runs on
the way out (a training child's process group is stopped, temp files are removed, a half-done
upload is never published), then `flowerml: error: stopped by SIGTERM`, `{"error", "kind":
"stopped"}` with --json, and exit 143 (130 for SIGINT). Python drops an exception raised in a
finaliser; `train` and `distill` raise such a lost SIGTERM again at their next epoch
(`raise_if_stop_was_lost`).

An empty value for any text option or argument (`--run-id ''`) is refused, naming it: an empty
string would otherwise read as "not given" and quietly pick a default.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TextIO, get_args

import click

from flowerml.core.errors import FlowermlError
from flowerml.core.recipes import Device
from flowerml.registry.names import DEFAULT_ALIAS

EXIT_REFUSED = 1
EXIT_ERROR = 2
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE


class CliError(click.ClickException):
    """One line on stderr (and the JSON error line with --json); exit code 2 unless set."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, kind: str = "bad-input") -> None:
        super().__init__(one_line(message))
        self.kind = kind

    def show(self, file: Any = None) -> None:
        click.echo(f"flowerml: error: {self.format_message()}", err=True)


def one_line(message: str) -> str:
    """Messages are one line, whatever a library put in them."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def describe_os_error(error: OSError) -> CliError:
    """A file the user named (or a setting pointed at) that cannot be used: one line."""
    name = error.filename if error.filename is not None else "file"
    reason = error.strerror or str(error)
    kind = {errno.ENOENT: "not-found", errno.EACCES: "denied", errno.EPERM: "denied",
            errno.EROFS: "denied"}.get(error.errno or 0, "bad-input")
    return CliError(f"{name}: {reason}", kind)


def as_cli_error(error: BaseException) -> CliError | None:
    """The one-line form of an error the user can act on; None for a bug."""
    if isinstance(error, CliError):
        return error
    if isinstance(error, FlowermlError):
        return CliError(str(error), error.kind)
    if isinstance(error, click.ClickException):  # usage errors: a bad option or argument
        return CliError(error.format_message(), "bad-input")
    if isinstance(error, OSError) and error.filename is not None:
        return describe_os_error(error)
    return None


def json_requested(args: Sequence[str]) -> bool:
    """Whether `--json` is among the options (not after a `--`)."""
    options = list(args)
    if "--" in options:
        options = options[:options.index("--")]
    return "--json" in options


# Where JSON goes: the real stdout, captured before a `--json` command's own stdout is pointed
# at stderr (so that nothing a library prints, torch's "Downloading: ..." say, lands among it).
_json_stream: ContextVar[TextIO | None] = ContextVar("json_stream", default=None)


def emit_json(value: object) -> None:
    """One JSON value on one line of the real stdout."""
    stream = _json_stream.get() or sys.stdout
    click.echo(json.dumps(value, sort_keys=True), file=stream)
    stream.flush()


def emit_listing(items: Sequence[Any], *, as_json: bool, empty: str) -> bool:
    """A `list` command's prologue: with --json, every item's `to_json()` as one array (True:
    nothing more to print); with no items, `empty` on stderr. False: print the items."""
    if as_json:
        emit_json([item.to_json() for item in items])
        return True
    if not items:
        click.echo(empty, err=True)
    return False


@contextlib.contextmanager
def stdout_for_json_only(as_json: bool) -> Iterator[None]:
    """With --json, everything but `emit_json` writes to stderr while the command runs."""
    if not as_json:
        yield
        return
    token = _json_stream.set(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stream.reset(token)


def report_failure(error: CliError, as_json: bool) -> None:
    error.show()
    if as_json:
        emit_json({"error": error.format_message(), "kind": error.kind})


class WarningLines(logging.Handler):
    """flowerml's warnings (a download being retried, say) as `flowerml: warning: ...` lines
    on whatever stderr is now (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"flowerml: warning: {one_line(record.getMessage())}", err=True)


def show_library_warnings() -> None:
    logger = logging.getLogger("flowerml")
    if not any(isinstance(handler, WarningLines) for handler in logger.handlers):
        handler = WarningLines(logging.WARNING)
        logger.addHandler(handler)
        logger.setLevel(min(logger.level or logging.WARNING, logging.WARNING))
        logger.propagate = False  # said once, in our words, not again by the root logger


def hide_torch_kernel_reregistration() -> None:
    """torch 2.14 installs its own aten::bmm kernel for CUDA as it is imported; when two
    threads import torch at once (the retrain flow's tasks and its background imports), it can
    install the same kernel twice and warn about overriding it, a line that says nothing to a
    user (seen on `flowerml retrain`'s stderr under load). The kernel is the same either way."""
    warnings.filterwarnings("ignore", message="Warning only once for all operators",
                            category=UserWarning)


class StdoutClosed(BaseException):
    """The reader of stdout (or stderr) went away: nothing more can be said, so the command
    ends. A BaseException, so that no `except Exception` reports or retries it."""


def output_closed() -> bool:
    """Whether stdout or stderr is a pipe whose reader has closed it (poll says POLLERR), so
    that an EPIPE from anything else (a socket, a child's pipe) is not taken for it."""
    import select

    poller = select.poll()
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            poller.register(stream.fileno(), select.POLLOUT)
    with contextlib.suppress(OSError):
        return any(events & select.POLLERR for _, events in poller.poll(0))
    return False


def silence_closed_output() -> None:
    """Point the closed descriptors at /dev/null, so that the flush at exit cannot fail again
    and print Python's 'Exception ignored ... BrokenPipeError'."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


class StoppedBySignal(BaseException):
    """SIGTERM or SIGINT reached the command. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way takes it for a failure to report or retry."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)

    def as_cli_error(self) -> CliError:
        error = CliError(f"stopped by {self.signal.name}", "stopped")
        error.exit_code = 128 + self.signal.value  # 143 for SIGTERM, as shells report it
        return error


@contextlib.contextmanager
def sigterm_stops_the_command() -> Iterator[None]:
    """While the command runs, SIGTERM raises `StoppedBySignal` in the main thread, once (a
    second SIGTERM must not cut short the tidying the first one started). The handler found
    is put back afterwards, unless the command installed its own meanwhile.

    Only in this process: a process forked from it (DataLoader workers, the decode cache's
    pool) that gets the signal dies of it as it did before, instead of unwinding a copy of the
    command. Off the main thread (an embedding program) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _raised_stop
    owner = os.getpid()

    def stop(signum: int, _frame: Any) -> None:
        global _raised_stop
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _raised_stop is None:
            _raised_stop = StoppedBySignal(signum)
            raise _raised_stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        # A command that took SIGTERM over (`flowerml worker` drains on it) keeps it until the
        # process ends: restored to the default, a second SIGTERM during exit would turn the
        # command's clean exit into death by signal.
        if signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, previous)
        _raised_stop = None


_raised_stop: StoppedBySignal | None = None
"""The SIGTERM the running command raised, if any (at most one: see above)."""


def raise_if_stop_was_lost() -> None:
    """Raise again the SIGTERM that was raised but never reached the command: Python drops an
    exception raised inside a weakref callback or a finaliser (import's module-lock cleanup
    runs one at any moment), so the command would run on to its end and exit 0. Long
    commands call this between steps (each epoch's event); while the exception is on its way
    out (a `finally` that reports progress) it does nothing."""
    if _raised_stop is not None and sys.exc_info()[1] is not _raised_stop:
        raise _raised_stop


class NotEmpty(click.ParamType):
    """A text parameter's own type, refusing an empty (or blank) value with one line naming the
    option: `--run-id ''` must not mean "no run id given"."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name
        self.envvar_list_splitter = inner.envvar_list_splitter

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if isinstance(value, str) and not value.strip():
            raise CliError(f"{parameter_name(param)} must not be empty")
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.inner.get_metavar(param, ctx)

    def to_info_dict(self) -> Any:
        return self.inner.to_info_dict()

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str
                       ) -> Any:
        return self.inner.shell_complete(ctx, param, incomplete)


def parameter_name(param: click.Parameter | None) -> str:
    """How the user typed it: `--run-id` for an option, `NAME` for an argument."""
    if param is None:
        return "value"
    if isinstance(param, click.Option) and param.opts:
        return param.opts[0]
    return param.human_readable_name


def refuse_empty_text(params: list[click.Parameter]) -> None:
    for param in params:
        if isinstance(param.type, click.types.StringParamType | click.Path):
            param.type = NotEmpty(param.type)


class FlowermlCommand(click.Command):
    """Every `flowerml` command: its text options and arguments refuse empty values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refuse_empty_text(self.params)


class FlowermlGroup(click.Group):
    """Turns library errors into one clear line and exit code 2, and a JSON line with --json;
    a stop by signal into its own line and exit code. Its commands and subgroups are
    `FlowermlCommand`s and `FlowermlGroup`s."""

    command_class = FlowermlCommand
    group_class = type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refuse_empty_text(self.params)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise StoppedBySignal(signal.SIGINT) from None
        except (click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            if not output_closed():
                raise
            raise StdoutClosed() from None  # past click's own EPIPE handling, which exits 1
        except Exception as error:
            converted = as_cli_error(error)
            if converted is None:
                raise
            raise converted from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        as_json = json_requested(args)
        show_library_warnings()
        hide_torch_kernel_reregistration()
        try:
            with sigterm_stops_the_command(), stdout_for_json_only(as_json):
                result = super().main(args, prog_name, complete_var, standalone_mode=False,
                                      **extra)
        except StdoutClosed:
            silence_closed_output()
            sys.exit(EXIT_STDOUT_CLOSED)
        except StoppedBySignal as stopped:
            error = stopped.as_cli_error()
            report_failure(error, as_json)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            report_failure(as_cli_error(error) or CliError(str(error)), as_json)
            sys.exit(error.exit_code)
        except click.Abort:
            report_failure(CliError("aborted", "stopped"), as_json)
            sys.exit(130)
        except Exception as error:
            if as_json:  # a bug: its traceback goes to stderr, stdout still ends in JSON
                emit_json({"error": f"internal error: {type(error).__name__}: "
                                    f"{one_line(error)}", "kind": "internal"})
            raise
        if isinstance(result, int) and standalone_mode:
            sys.exit(result)  # --help and --version exit this way
        return result


DEVICES: tuple[str, ...] = get_args(Device)  # the same tuple as flowerml.models.distributed

# Options every command spells the same way, with their defaults from one place.
store_option = click.option("--store", default=None,
                            help="Store: a folder path, file://PATH or s3://bucket[/prefix] "
                                 "(default: FLOWERML_STORE).")
dataset_option = click.option("--dataset", default=None,
                              help="Dataset name (default: FLOWERML_DATASET).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON on stdout and nothing else (human text goes to "
                                "stderr; a failure ends with {\"error\", \"kind\"}).")
alias_option = click.option("--alias", default=DEFAULT_ALIAS, show_default=True,
                            help="The registry alias.")


class Choice(click.Choice):
    """click.Choice whose refusal is one line naming the option, like every other bad input."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        option = param.opts[0] if param else "value"
        raise CliError(f"{option} must be one of {', '.join(map(str, self.choices))}: "
                       f"got {value!r}")


device_option = click.option("--device", type=Choice(DEVICES), default="auto",
                             show_default=True, help="Where to run the model.")


def training_options(command: Callable) -> Callable:
    """One option per `TrainConfig` field, its type, choices and help taken from the model."""
    from flowerml.core.recipes import TrainConfig, option_name

    for name, info in reversed(TrainConfig.model_fields.items()):
        help_text = f"{(info.description or info.title).rstrip('.')}. Default: the recipe's " \
                    f"({info.default!r} in 'default')."
        if info.annotation is bool:
            flag = option_name(name)
            decorator = click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                     help=help_text)
        else:
            choices = get_args(info.annotation)
            kind = Choice(choices) if choices else info.annotation
            decorator = click.option(option_name(name), name, type=kind, default=None,
                                     help=help_text)
        command = decorator(command)
    return command


@click.group(cls=FlowermlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowerml")
def cli() -> None:
    """flowerml: keep a Flowers-102 classifier fresh."""
