"""Small helpers for local files and the bytes the store keeps.

- `write_atomically`: a file appears whole or not at all (temp file beside it, then rename);
- `temp_beside`: that temp file, for writers that need to link or swap it in themselves;
- `file_lock`: a lock shared by threads and processes on one machine (the `filelock` package);
- `sha256_file` / `sha256_hex`: checksums of files (read in chunks) and of bytes;
- `json_bytes`: the one encoding of the JSON documents runs and the registry write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

Content = bytes | bytearray | memoryview | Callable[[Path], object]
"""What `write_atomically` writes: bytes, or a function that fills the temp file at a path."""


@contextlib.contextmanager
def temp_beside(path: Path) -> Iterator[Path]:
    """A fresh, empty temp file in `path`'s directory (same filesystem, so it can be renamed or
    linked into place); removed on exit unless it was moved. Its name starts with a dot, so
    listings that skip hidden files never see it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_exclusive(path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def _create_exclusive(directory: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with a random name, created as `open()` creates files: mode 0666 less
    the umask (and any default ACL), not mkstemp's 0600, so the file renamed into a shared
    store is as readable as any other the user writes there."""
    # The suffix is kept: some writers (torch.save) derive names from it.
    for _ in range(100):
        name = directory / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"no free temporary name in {directory}")


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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(value: object) -> bytes:
    """Deterministic, readable JSON bytes (sorted keys, indent 1): writing the same document
    twice gives the same bytes, so a concurrent helper writes exactly what its owner would."""
    return json.dumps(value, sort_keys=True, indent=1).encode()
