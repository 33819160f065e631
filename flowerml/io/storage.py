"""The object-store contract: `Store`, what it reports (`ObjectInfo`), the errors it raises,
and the options an S3 store is opened with (`S3Options`).

Every store gives the same guarantees: objects appear whole or not at all, create-only writes
(`if_none_match=True`) never overwrite, and compare-and-swap replaces (`if_match=etag`)
succeed for exactly one writer. The implementations are `flowerml.io.storage_local.LocalStore`
and `flowerml.io.storage_s3.S3Store`; `flowerml.io.storage_open.open_store` picks one for a URI.
Nothing here imports boto3 (only `flowerml.io.storage_s3` does).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerml.core.errors import FlowermlError, RetriesExhausted, UserError

Payload = bytes | Path
SMALL_OBJECT_BYTES = 8 * 1024 * 1024
PROBE_PREFIX = "_probe"
"""Where `Store.check_writable` writes (and at once deletes) its probe object."""
ProgressFn = Callable[[int], None]
"""Called once per transferred object with its size in bytes."""


class StoreError(FlowermlError):
    """Base of the store's errors."""


class ObjectNotFound(StoreError, UserError):
    """The key does not exist."""

    kind = "not-found"


class PreconditionFailed(StoreError):
    """A create-only or compare-and-swap write lost: re-read and decide again."""

    kind = "refused"


class StoreAccessError(StoreError, UserError):
    """The bucket does not exist, or credentials are missing or refused."""

    kind = "denied"


class ObjectTooLarge(StoreError, UserError):
    """An object over the size its reader allows (`get_bytes(key, limit=...)`)."""


class StoreUnreachable(StoreError, RetriesExhausted, UserError):
    """The endpoint did not answer after botocore's own retries, which own the S3 retry policy:
    no outer layer retries it again (that multiplied the attempts)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What `head` and `list` report about one object."""

    key: str
    size: int
    etag: str


class Store(ABC):
    """One object store, addressed by '/'-separated keys below its root."""

    def __init__(self, concurrency: int = 16) -> None:
        self.concurrency = concurrency

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where this store lives, without credentials."""

    @abstractmethod
    def check(self) -> None:
        """Fail early with a clear error when the store cannot be used."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        """Write an object; returns its etag. Raises PreconditionFailed when a condition fails."""

    @abstractmethod
    def get_with_etag(self, key: str, *, limit: int | None = None) -> tuple[bytes, str]:
        """An object's content and the etag of exactly that content; with `limit`,
        ObjectTooLarge instead of an object over `limit` bytes (nothing more is read)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> str:
        """Upload a local file (large ones in parts); returns its etag."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> Path:
        """Download an object to `path`, which appears whole or not at all."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """An object's size and etag, or None when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent objects are fine."""

    def get_bytes(self, key: str, *, limit: int | None = None) -> bytes:
        return self.get_with_etag(key, limit=limit)[0]

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create-only write; True when this writer owns `key`.

        The read-back costs one GET and guards against stores whose conditional PUT checks and
        then writes without a lock (moto's server): there two creators can both get 200, and
        only the one whose bytes are still there may go on. Real S3 and LocalStore never
        let two through, so on them the read-back always agrees.
        """
        try:
            self.put_bytes(key, data, if_none_match=True)
        except PreconditionFailed:
            return False
        try:
            return self.get_bytes(key) == data
        except ObjectNotFound:
            return False

    def location(self, key: str) -> str:
        """Where `key` lives, in full (a path or an s3:// URI), for messages and results."""
        return f"{self.uri}/{check_key(key)}"

    def remove_empty_folders(self, prefix: str) -> None:
        """Remove the empty folders that failed writes left under `prefix`."""
        return  # an object store has no folders: nothing is left empty

    @contextlib.contextmanager
    def writing_under(self, prefix: str) -> Iterator[None]:
        """Held by the one writer of the objects under `prefix` (an ingest publishing a
        version): a concurrent writer of the same prefix waits for it. On S3 nothing is
        needed: a PUT is whole or absent, and abandoned multipart uploads are swept apart."""
        yield

    def check_writable(self) -> None:
        """Fail early, with StoreAccessError, when this store's credentials cannot write: a
        create-only write of a small object under `_probe/`, then its delete. A read-only
        credential passes `check` and would otherwise fail at the first upload, after the
        work before it."""
        key = f"{PROBE_PREFIX}/{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.put_bytes(key, b"flowerml write probe\n", if_none_match=True)
        except StoreAccessError as error:
            raise StoreAccessError(f"cannot write to the store {self.uri}: {error}") from None
        except OSError as error:
            raise StoreAccessError(f"cannot write to the store {self.uri}: "
                                   f"{error.strerror or error}") from None
        try:
            self.delete(key)
        except StoreAccessError as error:
            raise StoreAccessError(f"the store {self.uri} takes writes but refuses deletes, "
                                   f"which publishing needs: {error}") from None

    def upload_many(self, items: Iterable[tuple[str, Payload]], *,
                    progress: ProgressFn | None = None) -> int:
        """Upload (key, bytes-or-path) pairs in parallel; `items` may be a lazy stream."""

        def upload(item: tuple[str, Payload]) -> int:
            key, payload = item
            if isinstance(payload, Path):
                size = payload.stat().st_size
                if size > SMALL_OBJECT_BYTES:
                    self.put_file(key, payload)
                    return size
                payload = payload.read_bytes()  # one request; the transfer manager costs more
            self.put_bytes(key, payload)
            return len(payload)

        return run_bounded(upload, items, self.concurrency, progress)

    def download_many(self, items: Iterable[tuple[str, Path]], *,
                      progress: ProgressFn | None = None) -> int:
        """Download (key, path) pairs in parallel."""

        def download(item: tuple[str, Path]) -> int:
            return self.get_file(*item).stat().st_size

        return run_bounded(download, items, self.concurrency, progress)


def run_bounded(work: Callable[[Any], int], items: Iterable[Any], concurrency: int,
                progress: ProgressFn | None = None) -> int:
    """Run `work` over `items` on a thread pool, holding at most 2x`concurrency` items at once.

    The bound keeps memory flat when `items` streams payloads out of a large archive. The
    first error cancels what has not started and is raised once the rest has finished.
    """
    done = 0
    in_flight: set[Future[int]] = set()

    def collect(futures: set[Future[int]]) -> None:
        nonlocal done
        for future in futures:
            size = future.result()
            done += 1
            if progress:
                progress(size)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flowerml-io") as pool:
        try:
            for item in items:
                if len(in_flight) >= 2 * concurrency:
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    collect(finished)
                in_flight.add(pool.submit(work, item))
            finished, in_flight = wait(in_flight)
            collect(finished)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    return done


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class S3Options:
    """Overrides of boto3's standard configuration chain; None keeps boto3's own value."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None
    request_checksum_calculation: str | None = None
    response_checksum_validation: str | None = None
