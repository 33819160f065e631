"""A Prefect server database migrated once per test session and copied into each server's home.

A Prefect server started on an empty SQLite file spends about 8 of its 12.5 CPU-s of start-up
running the schema migrations; on a database already at head it starts in about 4.5 CPU-s. The
suite starts about ten servers (one test harness per xdist worker, the deployment stacks,
`flowerml retrain` in Prefect's ephemeral mode), so each starts on a copy of one migrated file.
What the servers do is unchanged: the copy is the same schema they would have built themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

DATABASE = "prefect.db"  # Prefect's default: sqlite:///${PREFECT_HOME}/prefect.db


def migrated_database(folder: Path) -> Path:
    """`folder/prefect.db`, migrated to head by `prefect server database upgrade` the first
    time any process of the session asks (the others wait on a lock, then reuse it)."""
    folder.mkdir(parents=True, exist_ok=True)
    database = folder / DATABASE
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            home = Path(tempfile.mkdtemp(prefix="migrating-", dir=folder))
            env = {**os.environ, "PREFECT_HOME": str(home)}
            env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade",
                            "-y"], env=env, check=True, capture_output=True, timeout=600)
            copy_database(home / DATABASE, folder / f"{DATABASE}.tmp")
            os.replace(folder / f"{DATABASE}.tmp", database)
    return database


def copy_database(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite file (its write-ahead log folded in)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target


def seed_prefect_home(home: Path, template: Path) -> Path:
    """A PREFECT_HOME whose default database is a copy of `template` (unless it has one)."""
    database = home / DATABASE
    if not database.exists():
        copy_database(template, database)
    return home


@contextlib.contextmanager
def seeded_test_harness(template: Path, timeout: int = 120) -> Iterator[None]:
    """Prefect's own `prefect_test_harness`, its temporary database a copy of `template`.

    The harness names its database `prefect-test.db` in a folder of `mkdtemp()`; seeding that
    folder is the one change. Should Prefect rename either, the harness still works: it
    migrates an empty database, as it did before."""
    import prefect.testing.utilities as utilities

    def seeded_mkdtemp() -> str:
        folder = tempfile.mkdtemp()
        copy_database(template, Path(folder) / "prefect-test.db")
        return folder

    harness = contextlib.ExitStack()
    with mock.patch.object(utilities, "mkdtemp", seeded_mkdtemp):
        harness.enter_context(utilities.prefect_test_harness(server_startup_timeout=timeout))
    with harness:
        yield
