"""`LocalStore`: the store contract (`flowerml.io.storage.Store`) on a folder of a local or
shared filesystem, with S3's atomicity.

Every write goes to a temp file beside its key (`.tmp-*`, from `flowerml.core.files.temp_beside`)
and is renamed into place; create-only writes link, which fails when the name exists; compare-and-swap runs under a per-key lock held across threads and processes;
etags are (inode, mtime, size), the mtime advanced on every write so that none repeats.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flowerml.core.files import (
    FileRefused,
    file_lock,
    open_user_file,
    sha256_hex,
    temp_beside,
    write_atomically,
)
from flowerml.io.storage import (
    PROBE_PREFIX,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    Store,
    StoreAccessError,
    check_key,
)

TEMP_PREFIX = ".tmp-"
"""How `flowerml.core.files.temp_beside` names the temp files of a LocalStore's writes."""


class LocalStore(Store):
    """A directory on a local or shared filesystem, with the same atomicity as S3."""

    LOCK_DIR = ".flowerml-locks"

    def __init__(self, root: Path | str, concurrency: int = 16) -> None:
        super().__init__(concurrency)
        self.root = Path(root).expanduser().resolve()
        self._local_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._created_by_check: list[Path] = []  # the root and the parents check() made

    @property
    def uri(self) -> str:
        return str(self.root)

    def check(self) -> None:
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._created_by_check = missing or self._created_by_check
        except OSError as error:
            raise StoreAccessError(f"cannot create store directory {self.root}: "
                                   f"{error.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreAccessError(f"store directory {self.root} is not writable")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def check_writable(self) -> None:
        """The probe of `Store.check_writable`, its `_probe/` folder removed after it; a store
        folder not made yet is judged by the nearest folder that exists, without writing."""
        if not self.root.exists():
            existing = next(p for p in self.root.parents if p.exists())
            if not os.access(existing, os.W_OK | os.X_OK):
                raise StoreAccessError(f"cannot write to the store {self.root}: cannot create "
                                       f"it in {existing} (permission denied)")
            return
        try:
            super().check_writable()
        finally:
            _remove_if_empty(self.root / PROBE_PREFIX)

    @staticmethod
    def _etag(stat: os.stat_result) -> str:
        # Every write renames a fresh file into place, so (inode, mtime, size) changes with it.
        return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"

    @staticmethod
    def _advance_mtime(temp: Path, path: Path) -> None:
        """Give each write of a key a later mtime than the last, so its etag cannot repeat.

        Inodes are reused and mtimes tick coarsely: two same-sized writes in one tick would
        otherwise share an etag, and a stale compare-and-swap could win.
        """
        try:
            previous = path.stat().st_mtime_ns
        except FileNotFoundError:
            previous = 0
        stamp = max(time.time_ns(), previous + 1000)
        os.utime(temp, ns=(stamp, stamp))

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        path = self._path(key)
        with temp_beside(path) as temp:
            temp.write_bytes(data)
            if if_none_match:
                self._link_exclusive(temp, path, key)
            elif if_match is not None:
                with self._lock(key):
                    current = self.head(key)
                    if current is None or current.etag != if_match:
                        raise PreconditionFailed(f"{key}: changed since it was read")
                    self._advance_mtime(temp, path)
                    os.replace(temp, path)
            else:
                os.replace(temp, path)
        return self._etag(path.stat())

    @staticmethod
    def _link_exclusive(temp: Path, path: Path, key: str) -> None:
        try:
            os.link(temp, path)  # atomic, and fails when the name exists
        except FileExistsError:
            raise PreconditionFailed(f"{key}: already exists") from None

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Serialise compare-and-swap on one key across threads and processes."""
        with self._locks_guard:
            local = self._local_locks.setdefault(key, threading.Lock())
        # The thread lock spares threads the file lock's polling; the file lock serialises
        # processes (and is released by the OS if its holder dies).
        with local, file_lock(self.root / self.LOCK_DIR / sha256_hex(key.encode())):
            yield

    def get_with_etag(self, key: str, *, limit: int | None = None) -> tuple[bytes, str]:
        # Opened as a file a user named: a FIFO or a device under the root (a key linked to
        # /dev/zero) is refused instead of blocking or never ending.
        path = self._path(key)
        try:
            with open_user_file(path, limit=sys.maxsize if limit is None else limit,
                                what="this object") as handle:
                return handle.read(), self._etag(os.fstat(handle.fileno()))
        except FileRefused as refused:
            if refused.kind == "not-found" or path.is_dir():
                raise ObjectNotFound(f"{key}: not found in {self.uri}") from None
            if refused.reason.startswith("larger than"):
                raise ObjectTooLarge(f"{key} in {self.uri}: {refused.reason}") from None
            raise

    def put_file(self, key: str, path: Path) -> str:
        dest = self._path(key)
        write_atomically(dest, lambda temp: shutil.copyfile(path, temp))
        return self._etag(dest.stat())

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{key}: not found in {self.uri}")
        return write_atomically(path, lambda temp: shutil.copyfile(source, temp))

    def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._path(key)):
            return None
        return ObjectInfo(key, stat.st_size, self._etag(stat))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        keys = []
        for directory, dirnames, filenames in os.walk(base, onerror=self._unreadable):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(directory, self.root)
            for filename in filenames:
                if filename.startswith("."):
                    continue
                key = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            info = self.head(key)
            if info is not None:
                yield info

    def _unreadable(self, error: OSError) -> None:
        """os.walk's error handler: a folder that cannot be read is refused, naming it (walk
        would skip it, and a listing would say "nothing there"); one removed meanwhile is
        nothing to list."""
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            return
        raise StoreAccessError(f"cannot read {error.filename} in the store {self.root}: "
                               f"{error.strerror or error}")

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def writing_under(self, prefix: str) -> Iterator[None]:
        """An exclusive lock on `prefix` (across threads and processes; the OS releases it
        when its holder dies), and under it the temp files a writer stopped mid-write left
        there (SIGKILL, a power cut) removed first: every writer of the prefix holds the lock,
        so none of them is anyone's write in progress."""
        with self._lock(f"{prefix.strip('/')}/"):
            self.remove_temp_files(prefix)
            yield

    def remove_temp_files(self, prefix: str) -> int:
        """Remove the writers' temp files (`.tmp-*`) under `prefix`; returns how many. Only
        for a caller that knows no write under `prefix` is in progress (`writing_under`)."""
        removed = 0
        for folder, dirnames, filenames in os.walk(self._path(prefix.strip("/"))):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        removed += 1
        return removed

    def remove_empty_folders(self, prefix: str) -> None:
        """Remove the empty folders under `prefix`, then `prefix` and its parents while empty,
        then the root and its parents if check() created them and they are empty.

        rmdir removes only empty folders, so nothing written is lost; a concurrent writer that
        has just made a folder and not yet put its temp file there makes it again
        (`flowerml.core.files.temp_beside`).
        """
        top = self._path(prefix.strip("/"))
        for folder, _, _ in os.walk(top, topdown=False):
            if not Path(folder).name.startswith("."):  # lock folders are in use by others
                _remove_if_empty(Path(folder))
        for folder in top.parents:
            if folder == self.root:
                break
            _remove_if_empty(folder)
        for folder in self._created_by_check:
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, already gone, or not ours to remove
        folder.rmdir()
