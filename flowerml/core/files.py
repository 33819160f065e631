"""Small helpers for local files and the bytes the store keeps.

- `write_atomically`: a file appears whole or not at all (temp file beside it, then rename);
- `temp_beside`: that temp file, for writers that need to link or swap it in themselves;
- `file_lock`: a lock shared by threads and processes on one machine (the `filelock` package);
- `sha256_file` / `md5_file` / `sha256_hex`: checksums of files (read in chunks) and of bytes
  (MD5 only where a source publishes it: the Flowers-102 files);
- `json_bytes`: the one encoding of the JSON documents runs and the registry write;
- `open_user_file` / `read_user_file`: a file a user named (an image, a list of keys), opened
  safely: regular files only (a FIFO would block the read forever, a device such as /dev/zero
  never ends), checked before it is opened and again on the open descriptor, and read with a
  cap on its size. What cannot be read is a `FileRefused` saying why in words.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from flowerml.core.errors import UserError

Content = bytes | bytearray | memoryview | Callable[[Path], object]
"""What `write_atomically` writes: bytes, or a function that fills the temp file at a path."""


def make_folder(folder: Path) -> None:
    """`folder` and its parents, also while other threads remove empty folders there and make
    them again: Path.mkdir(exist_ok=True) raises FileExistsError when the folder it found is
    removed before it checks that it is one. One stat decides (two checks could see the folder
    gone, then made again)."""
    for _ in range(100):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except FileExistsError:
            try:
                mode = folder.stat().st_mode
            except FileNotFoundError:
                continue  # removed under us: make it again
            if stat.S_ISDIR(mode):
                return  # made again by another thread
            raise  # a file where the folder should be
    folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def temp_beside(path: Path) -> Iterator[Path]:
    """A fresh, empty temp file in `path`'s directory (same filesystem, so it can be renamed or
    linked into place); removed on exit unless it was moved. Its name starts with a dot, so
    listings that skip hidden files never see it."""
    make_folder(path.parent)
    created: list[Path] = []
    try:
        yield _create_exclusive(path.parent, prefix=".tmp-", suffix=path.suffix, into=created)
    finally:
        for temp in created:
            temp.unlink(missing_ok=True)


def _create_exclusive(directory: Path, prefix: str, suffix: str, into: list[Path]) -> Path:
    """A new empty file with a random name, created as `open()` creates files: mode 0666 less
    the umask (and any default ACL), not mkstemp's 0600, so the file renamed into a shared
    store is as readable as any other the user writes there. Its name is in `into` before a
    signal can interrupt (SIGTERM raises in the CLI), so the caller's cleanup always finds it."""
    # The suffix is kept: some writers (torch.save) derive names from it.
    for _ in range(100):
        name = directory / f"{prefix}{secrets.token_hex(8)}{suffix}"
        with _signals_held():
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                continue
            except FileNotFoundError:
                # A concurrent tidy-up (LocalStore.remove_empty_folders, the write probe's
                # folder) removed the folder while it was still empty: make it again. Once
                # the temp file is in it, rmdir leaves it alone.
                make_folder(directory)
                continue
            into.append(name)
        os.close(fd)
        return name
    raise FileExistsError(f"no free temporary name in {directory}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back for a few instructions (delivered right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_atomically(path: Path, content: Content) -> Path:
    """Write `path` whole or not at all: `content` goes to a temp file beside it, which then
    replaces `path` in one rename. A crash leaves the old file (or none), never a torn one."""
    path = Path(path)
    with temp_beside(path) as temp:
        if isinstance(content, bytes | bytearray | memoryview):
            temp.write_bytes(content)
        else:
            content(temp)
        os.replace(temp, path)
    return path


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on `path` (created with its directory) for `with`: it serialises
    threads and processes alike, and the OS releases it if its holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: each call gets its own lock object, so threads contend like processes.
    return FileLock(path, thread_local=False, is_singleton=False)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (never whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def md5_file(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in chunks (the published Flowers-102 checksums are MD5)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(value: object) -> bytes:
    """Deterministic, readable JSON bytes (sorted keys, indent 1): writing the same document
    twice gives the same bytes, so a concurrent helper writes exactly what its owner would."""
    return json.dumps(value, sort_keys=True, indent=1).encode()


# --------------------------------------------------------------------------------------------
# Files a user named


class FileRefused(UserError):
    """A file a user named that cannot be read: missing, a folder, not a regular file, over
    its size cap, unreadable. `reason` is the message without the path (a per-input row names
    the input itself)."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = "bad-input") -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode cannot be read as data, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"is {kind}, not a regular file"


def _refusal(path: str | os.PathLike, error: OSError) -> FileRefused:
    if isinstance(error, FileNotFoundError | NotADirectoryError):  # ENOTDIR: a parent is a file
        return FileRefused(path, "no such file", "not-found")
    if isinstance(error, IsADirectoryError):
        return FileRefused(path, "is a folder, not a file")
    if isinstance(error, PermissionError):
        return FileRefused(path, "permission denied", "denied")
    if error.errno == errno.ELOOP:
        return FileRefused(path, "symbolic link loop")
    return FileRefused(path, f"cannot read: {error.strerror or error}")


def _too_large(path: str | os.PathLike, limit: int, what: str) -> FileRefused:
    return FileRefused(path, f"larger than {size_text(limit)}, the limit for {what}")


def size_text(size: int) -> str:
    """A byte count as a person reads it: 512 MiB, 64 KiB, 100 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


class _CappedReader(io.RawIOBase):
    """A file descriptor read no further than `limit` bytes into the file: a file that grows
    while it is read, or a /proc file whose size says 0, still ends there."""

    def __init__(self, raw: io.FileIO, path: str | os.PathLike, limit: int, what: str) -> None:
        super().__init__()
        self._raw, self._path, self._limit, self._what = raw, path, limit, what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: memoryview | bytearray) -> int | None:  # type: ignore[override]
        view = memoryview(buffer)
        room = self._limit + 1 - self._raw.tell()  # one byte past the cap shows it is over
        if room <= 0:
            raise _too_large(self._path, self._limit, self._what)
        try:
            count = self._raw.readinto(view[:min(len(view), room)])
        except OSError as error:  # EIO and the like (/proc/self/mem)
            raise FileRefused(self._path, f"cannot read: {error.strerror or error}") from None
        if count and self._raw.tell() > self._limit:
            raise _too_large(self._path, self._limit, self._what)
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


def check_user_file(path: str | os.PathLike) -> None:
    """`FileRefused` unless `path` is a regular file (or a link to one); opens nothing."""
    try:
        refused = _not_regular(os.stat(path).st_mode)
    except OSError as error:
        raise _refusal(path, error) from None
    if refused:
        raise FileRefused(path, refused)


@contextlib.contextmanager
def open_user_file(path: str | os.PathLike, *, limit: int, what: str = "a file"
                   ) -> Iterator[BinaryIO]:
    """`path` open for reading in binary, buffered, refused with `FileRefused` unless it is a
    regular file of at most `limit` bytes; reads past `limit` raise it too. `what` names the
    kind of file in the size refusal ("larger than 512 MiB, the limit for an image file").

    The kind is checked with stat before opening (opening some devices has effects), then on
    the descriptor, which was opened with O_NONBLOCK so that a FIFO swapped in between cannot
    block the open; reads of a regular file never block, so the flag is harmless after."""
    check_user_file(path)
    try:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        descriptor = os.open(path, flags)
    except OSError as error:
        raise _refusal(path, error) from None
    raw = io.FileIO(descriptor, "rb", closefd=True)
    try:
        status = os.fstat(descriptor)
        refused = _not_regular(status.st_mode)
        if refused:
            raise FileRefused(path, refused)
        if status.st_size > limit:
            raise _too_large(path, limit, what)
        reader = io.BufferedReader(_CappedReader(raw, path, limit, what))
    except BaseException:
        raw.close()
        raise
    with reader:
        yield reader  # type: ignore[misc]


def read_user_file(path: str | os.PathLike, *, limit: int, what: str = "a file") -> bytes:
    """The bytes of `path`, under `open_user_file`'s rules."""
    with open_user_file(path, limit=limit, what=what) as handle:
        return handle.read()
