"""The object-store contract and its two implementations: `LocalStore` and `S3Store`.

Both give the same guarantees: objects appear whole or not at all, create-only writes
(`if_none_match=True`) never overwrite, and compare-and-swap replaces (`if_match=etag`)
succeed for exactly one writer. This is the only module that imports boto3.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowerml.download import redact_url
from flowerml.errors import FlowermlError, RetriesExhausted, SettingsError, UserError
from flowerml.files import (
    FileRefused,
    file_lock,
    open_user_file,
    sha256_hex,
    size_text,
    temp_beside,
    write_atomically,
)
from flowerml.locations import LocalLocation, parse_store

Payload = bytes | Path
SMALL_OBJECT_BYTES = 8 * 1024 * 1024
PROBE_PREFIX = "_probe"
"""Where `Store.check_writable` writes (and at once deletes) its probe object."""
TEMP_PREFIX = ".tmp-"
"""How `flowerml.files.temp_beside` names the temp files of a LocalStore's writes."""
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


# --------------------------------------------------------------------------------------------
# LocalStore


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

        rmdir removes only empty folders, so nothing written is lost; but a concurrent writer
        that has just made a folder and not yet put its temp file there sees that write fail.
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


# --------------------------------------------------------------------------------------------
# S3Store


@dataclass(frozen=True)
class S3Options:
    """Overrides of boto3's standard configuration chain; None keeps boto3's own value."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None
    request_checksum_calculation: str | None = None
    response_checksum_validation: str | None = None


class S3Store(Store):
    """A bucket (and optional prefix) on AWS S3 or any S3-compatible endpoint."""

    MULTIPART_THRESHOLD = 64 * 1024 * 1024
    STALE_UPLOAD_AGE = timedelta(days=1)
    """A multipart upload pending longer than this was abandoned (a killed process)."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None,
                 concurrency: int = 16) -> None:
        super().__init__(concurrency)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = build_s3_client(options or S3Options(), concurrency)
        self.endpoint = self.client.meta.endpoint_url
        self.shown_endpoint = redact_url(self.endpoint or "")
        """The endpoint as messages show it: without user:password@ (a URL may carry them)."""
        self._sweep_guard = threading.Lock()
        self._swept = False

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"bucket '{self.bucket}' at {self.shown_endpoint}"

    def _translate(self, error: Exception, key: str | None = None) -> Exception:
        """Map a boto3 failure to our typed errors; messages never carry credentials."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            EndpointResolutionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(error, EndpointResolutionError):  # its text echoes the URL, credentials too
            return SettingsError(f"invalid S3 endpoint {self.shown_endpoint} (from "
                                 f"{ENDPOINT_ORIGINS}): not a URL S3 can be reached at")
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return StoreAccessError(f"no usable AWS credentials for {self._where()} (set "
                                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
        if isinstance(error, ConnectionError | HTTPClientError):
            cause = connection_failure(error, urlsplit(self.endpoint or "").hostname)
            return StoreUnreachable(f"cannot reach S3 endpoint {self.shown_endpoint} "
                                    f"(bucket '{self.bucket}'): {cause}")
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreAccessError(f"{self._where()} does not exist")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"{key}: not found in {self.uri}")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(f"{key}: precondition failed ({code})")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "ExpiredToken"):
                return StoreAccessError(f"access denied to {self._where()} ({code})")
            if status is not None and status >= 500:
                return StoreUnreachable(f"S3 endpoint {self.shown_endpoint} failed: HTTP "
                                        f"{status}")
        return error

    @contextlib.contextmanager
    def _translated(self, key: str | None = None) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            translated = self._translate(error, key)
            if translated is error:
                raise
            raise translated from None
        except S3UploadFailedError as error:
            raise self._translate_upload(error, key) from None

    def _translate_upload(self, error: Exception, key: str | None) -> Exception:
        """The transfer manager wraps the ClientError of a failed PutObject, multipart step or
        part in S3UploadFailedError (raised inside its `except`, so it is the context): map
        that cause as any other, and name the key and bucket (its own text names the local
        file and the service's message, never credentials)."""
        from botocore.exceptions import BotoCoreError, ClientError

        cause = error.__cause__ or error.__context__
        where = f"uploading {key} to {self.uri}"
        if isinstance(cause, ClientError | BotoCoreError):
            translated = self._translate(cause, key)
            if translated is not cause:
                return type(translated)(f"{translated}, {where}")
            if isinstance(cause, ClientError):
                code = cause.response.get("Error", {}).get("Code", "")
                return StoreError(f"S3 refused {where} at {self.shown_endpoint} ({code})")
        return StoreError(f"{where} at {self.shown_endpoint} failed: {type(error).__name__}")

    def check(self) -> None:
        try:
            with self._translated():
                self.client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound:  # head_bucket has no body, so a missing bucket is a bare 404
            raise StoreAccessError(f"{self._where()} does not exist") from None

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        with self._translated(key):
            return self.client.put_object(**args)["ETag"]

    def get_with_etag(self, key: str, *, limit: int | None = None) -> tuple[bytes, str]:
        with self._translated(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if limit is not None and response["ContentLength"] > limit:
                response["Body"].close()
                raise ObjectTooLarge(f"{key} in {self.uri}: larger than {size_text(limit)}, "
                                     "the limit for this object")
            return response["Body"].read(), response["ETag"]

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD,
                              max_concurrency=self.concurrency, use_threads=True)

    def put_file(self, key: str, path: Path) -> str:
        self._abort_stale_uploads_once()
        # A failed multipart upload is aborted by the transfer manager itself (its failure
        # cleanup); one left behind by a killed process is swept by the next store's first
        # upload (`_abort_stale_uploads_once`).
        with self._translated(key):
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    Config=self._transfer_config())
        info = self.head(key)
        return info.etag if info else ""

    def _abort_stale_uploads_once(self) -> None:
        with self._sweep_guard:
            if self._swept:
                return
            self._swept = True
        self.abort_stale_uploads()

    def abort_stale_uploads(self, older_than: timedelta | None = None) -> int:
        """Abort the multipart uploads under our prefix begun more than `older_than` ago
        (default STALE_UPLOAD_AGE): their parts cost storage and no one will complete them.
        Best effort: a credential without ListBucketMultipartUploads skips it. Returns how
        many were aborted."""
        from botocore.exceptions import BotoCoreError, ClientError

        cutoff = datetime.now(UTC) - (self.STALE_UPLOAD_AGE if older_than is None
                                      else older_than)
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket,
                                           Prefix=f"{self.prefix}/" if self.prefix else ""):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket,
                                                           Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        except (BotoCoreError, ClientError):
            pass
        return aborted

    def get_file(self, key: str, path: Path) -> Path:
        def download(temp: Path) -> None:
            with self._translated(key):
                self.client.download_file(self.bucket, self._key(key), str(temp),
                                          Config=self._transfer_config())

        return write_atomically(path, download)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._translated(key):
                response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, response["ContentLength"], response["ETag"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with self._translated(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"][strip:], item["Size"], item["ETag"])

    def delete(self, key: str) -> None:
        with self._translated(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def connection_failure(error: BaseException, host: str | None = None) -> str:
    """Why a connection (to `host`) failed, in words, from the socket error that botocore and
    urllib3 wrap; the exception's class name when there is none."""
    import socket

    unknown_host = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
    cause: BaseException | None = error
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, socket.gaierror):
            if cause.errno in unknown_host:
                return f"unknown host '{host}'" if host else "unknown host"
            return f"host name lookup failed ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, TimeoutError):
            return "timed out"
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


def build_s3_client(options: S3Options, concurrency: int = 16) -> Any:
    """A boto3 S3 client: the standard AWS chain, with our overrides on top."""
    import boto3
    from botocore.config import Config

    config_args: dict[str, Any] = {
        "max_pool_connections": max(10, concurrency * 2),
        "retries": {"max_attempts": 4, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if options.addressing_style:
        config_args["s3"] = {"addressing_style": options.addressing_style}
    if options.request_checksum_calculation:
        config_args["request_checksum_calculation"] = options.request_checksum_calculation
    if options.response_checksum_validation:
        config_args["response_checksum_validation"] = options.response_checksum_validation
    try:
        session = boto3.session.Session(region_name=options.region)
        return session.client("s3", endpoint_url=options.endpoint_url,
                              config=Config(**config_args))
    except Exception as error:  # noqa: BLE001 - botocore's configuration errors, below
        refused = aws_configuration_problem(error, options)
        if refused is None:
            raise
        raise refused from None


ENDPOINT_ORIGINS = "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or endpoint_url in the AWS config"
"""Where boto3 takes an S3 endpoint from when FLOWERML_S3_ENDPOINT_URL does not set one."""


def aws_configuration_problem(error: Exception, options: S3Options) -> SettingsError | None:
    """A bad value in the AWS configuration chain that boto3 refuses when it builds a client,
    as one line naming where it comes from (the value shown without credentials), or None."""
    from botocore.exceptions import ConfigParseError, InvalidRegionError, ProfileNotFound

    if isinstance(error, ProfileNotFound):
        return SettingsError(f"invalid setting AWS_PROFILE: no profile "
                             f"'{error.kwargs.get('profile')}' in the AWS config or credentials "
                             "file (~/.aws/config, ~/.aws/credentials)")
    if isinstance(error, ConfigParseError):
        return SettingsError(f"cannot read the AWS config file {error.kwargs.get('path')}: it "
                             "is not valid INI")
    if isinstance(error, InvalidRegionError):
        origin = ("setting FLOWERML_S3_REGION" if options.region else
                  "AWS region (AWS_REGION, AWS_DEFAULT_REGION or region in the AWS config)")
        return SettingsError(f"invalid {origin}: '{error.kwargs.get('region_name')}' is not a "
                             "region name (letters, digits and '-', like eu-west-1)")
    if isinstance(error, ValueError) and str(error).startswith("Invalid endpoint"):
        origin = ("setting FLOWERML_S3_ENDPOINT_URL" if options.endpoint_url else
                  f"S3 endpoint ({ENDPOINT_ORIGINS})")
        shown = redact_url(str(error).removeprefix("Invalid endpoint:").strip())
        return SettingsError(f"invalid {origin}: '{shown}' is not an http:// or https:// URL")
    return None


def open_store(uri: str, *, s3: S3Options | None = None, concurrency: int = 16,
               name: str = "store") -> Store:
    """The store a URI names: a folder path, file://PATH or s3://bucket[/prefix]
    (`flowerml.locations.parse_store`, which refuses anything else naming it as `name`)."""
    where = parse_store(uri, name)
    if isinstance(where, LocalLocation):
        try:
            return LocalStore(where.path, concurrency=concurrency)
        except (RuntimeError, OSError) as error:  # Path.resolve: a symbolic link loop
            reason = "a symbolic link loop" if "loop" in str(error).lower() else str(error)
            raise UserError(f"{name} {where.path} cannot be used: {reason} on its path"
                            ) from None
    return S3Store(where.bucket, where.prefix, s3, concurrency=concurrency)
