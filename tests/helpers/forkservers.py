"""The multiprocessing forkserver that tests start worker processes from, stopped when done."""

from __future__ import annotations


def stop_forkserver() -> None:
    """Stop this process's forkserver and wait for it, as CPython's own tests do (a private
    method: no public one exists): it reaped the workers it forked, so their CPU time and its
    own are counted with this process's children (left running, it would outlive pytest as an
    orphan). The next user of a forkserver starts a fresh one, with its own preloads."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # noqa: SLF001
    if stop is not None:
        stop()
