"""What a user names as images, for `flowerml predict` and `flowerml score`: one rule set, one
expander, and the reading of each image's bytes.

An INPUT is one of:

- a file: that one image, whatever its name;
- a folder, local or an `s3://bucket/prefix`: the files below it named like images
  (`IMAGE_SUFFIXES`, any case), depth first, each folder's names sorted. On disk, hidden names
  (a leading '.') are skipped and symlinked folders are not entered (a loop would never end);
  anything else named like an image is kept, so a FIFO, a device or a broken link is that
  image's error when it is read;
- a glob over either (`photos/**/*.jpg`, `s3://bucket/inbox/*.png`), expanded here for shells
  and callers that pass it on unexpanded: the image files below the folder before the first
  wildcard that match it, or that lie in a folder that matches it (as a shell would give that
  folder). Matching is wcmatch's, with GLOBSTAR: `*`, `?` and `[...]` stay within one folder,
  `**` spans any number of them. A path that exists is that path, pattern characters or not;
- a list file, `.txt` (one key per line; blank lines and `#` comments skipped) or `.json` (an
  array of strings, streamed by ijson), local or on S3: every entry, named like an image or not
  (one that is not an image is its own error), each relative to the list's own folder, an
  absolute path, or an `s3://` URI.

A listing reads nothing until its keys are iterated, and never holds them all in memory.
`KeyReader` reads one key's bytes as a file the user named: a regular file or an object (a
FIFO or a device is refused before it is opened), at most `MAX_IMAGE_BYTES`.

`flowerml score` takes one INPUT (`list_input`) and refuses one that cannot be listed;
`flowerml predict` takes several (`expand_inputs`), and an INPUT that cannot be listed or
names no image is that input's error row.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal

import ijson
from wcmatch import glob as wcglob

from flowerml.core.errors import UserError
from flowerml.core.files import (
    FileRefused,
    check_user_file,
    open_user_file,
    read_user_file,
    size_text,
)
from flowerml.io.locations import LocalLocation, bucket_name_problem, parse_store
from flowerml.io.storage import ObjectNotFound, ObjectTooLarge, S3Options, Store, StoreAccessError
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_open import open_store
from flowerml.io.storage_s3 import S3Store

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""What a folder or a glob gives (any case); a file or a list entry is tried whatever its name."""

MAX_IMAGE_BYTES = 512 * 2**20
"""The largest image file read: twice the largest uncompressed 8-bit RGB image that PIL's
decompression-bomb limit lets through (89.5 megapixels, 256 MiB)."""

LIST_SUFFIXES = (".txt", ".json")
MAX_LIST_BYTES = 2 * 2**30
"""The largest list file read (some 20 million keys): a list is streamed, so the cap only ends
a file that never ends."""

GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.DOTMATCH | wcglob.CASE
"""'**' spans folders; hidden names on disk are skipped by the walk, not by the pattern (an S3
key may start with a dot); case counts, on every platform."""

InputKind = Literal["file", "folder", "pattern", "list"]


class InputError(UserError):
    """An INPUT that cannot be listed: missing, not a regular file, an unreadable folder, a
    list that is not UTF-8 text or not a JSON array of strings."""

    def __init__(self, input: str, reason: str) -> None:
        super().__init__(input, reason)  # both, so that the error pickles whole
        self.input, self.reason = input, reason

    def __str__(self) -> str:
        return f"INPUT {self.input}: {self.reason}" if self.input.strip() else \
            f"INPUT {self.reason}"


class ImageUnreadable(Exception):
    """One key that cannot be read; its message goes in the key's row."""


@dataclass(frozen=True)
class InputListing:
    """What INPUT names: where relative keys are read from (`root`, a folder path or an
    s3:// URI) and the keys, streamed in a fixed order. `shown_as`: what the user typed before
    each relative key, so that a key is shown as the path they would type."""

    input: str
    kind: InputKind
    root: str
    stream: Callable[[], Iterator[str]]
    shown_as: str = ""

    @property
    def only_images(self) -> bool:
        """A folder's or a glob's keys are kept only when named like images (a file's and a
        list's are all tried)."""
        return self.kind in ("folder", "pattern")

    def name(self, key: str) -> str:
        if self.kind == "file":
            return self.input
        return key if is_absolute(key) else f"{self.shown_as}{key}"


def is_pattern(text: str) -> bool:
    return any(character in text for character in "*?[")


def is_image_name(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


def is_absolute(key: str) -> bool:
    return key.startswith("s3://") or os.path.isabs(key)


def folder_prefix(folder: str) -> str:
    """How keys below `folder` (as typed) are shown: 'photos' -> 'photos/', '' -> ''."""
    return folder if not folder or folder.endswith("/") else f"{folder}/"


# --------------------------------------------------------------------------------------------
# Listing one INPUT


def list_input(text: str, s3: S3Options | None = None) -> InputListing:
    """INPUT as a listing (nothing is read until its keys are iterated)."""
    if not text.strip():
        raise InputError(text, "must not be empty")
    local = not text.startswith(("s3://", "file://"))
    path = os.path.expanduser(text) if local else text
    if text.lower().endswith(LIST_SUFFIXES) and not (local and os.path.isdir(path)):
        return list_file_listing(text, s3)
    if is_pattern(text) and not (local and os.path.lexists(path)):
        return glob_listing(text, s3)
    if local and os.path.lexists(path) and not os.path.isdir(path):
        return file_listing(text, path)
    if local and not os.path.isdir(path):
        raise InputError(text, "no such file or folder")
    store = open_input_store(text, s3)
    return InputListing(text, "folder", store.uri, lambda: store_keys(store, text),
                        shown_as=folder_prefix(text))


def file_listing(text: str, path: str) -> InputListing:
    """One file named on its own: a listing of one, refused unless it is a regular file (a
    FIFO or a device is never opened)."""
    try:
        check_user_file(path)
    except FileRefused as refused:
        reason = "no such file or folder" if refused.kind == "not-found" else refused.reason
        raise InputError(text, reason) from None
    image = Path(path).resolve()
    return InputListing(text, "file", str(image.parent), lambda: iter([image.name]))


def open_input_store(uri: str, s3: S3Options | None) -> Store:
    return open_store(uri, s3=s3, name="INPUT")


def store_keys(store: Store, text: str) -> Iterator[str]:
    """Every key below a store's root, streamed in a fixed order: S3's listing pages, or a
    folder walked one directory at a time, so a folder of millions of files is never held in
    memory. `text` is the INPUT, for messages."""
    if isinstance(store, LocalStore):
        yield from walk_sorted(store.root, "", text)
    else:
        yield from (info.key for info in store.list(""))


def walk_sorted(folder: Path, prefix: str, text: str) -> Iterator[str]:
    """The files below `folder`, depth first, each directory's names sorted, hidden names
    skipped; only one directory's names are held at a time (per level of depth)."""
    try:
        with os.scandir(folder) as scan:
            # A symlinked folder is neither entered (a link loop would never end) nor a key.
            names = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan
                           if not entry.name.startswith(".")
                           and (entry.is_dir(follow_symlinks=False) or not entry.is_dir()))
    except OSError as error:
        raise InputError(text, f"cannot read folder {folder}: {error.strerror or error}") \
            from None
    for name, is_dir in names:
        if is_dir:
            yield from walk_sorted(folder / name, f"{prefix}{name}/", text)
        else:
            yield f"{prefix}{name}"


def glob_listing(pattern: str, s3: S3Options | None) -> InputListing:
    """A glob over a folder or an S3 prefix: the folder before the first wildcard is listed,
    and its keys are matched against the rest."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    base, _, _ = head.rpartition("/")
    rest = pattern[len(base) + 1:] if base else pattern
    if not base and pattern.startswith("/"):
        base, rest = "/", pattern[1:]
    if base.endswith(":/") or base == "s3:":
        raise InputError(pattern, "a pattern needs a bucket or folder before its first "
                                  "wildcard")
    store = open_input_store(base or ".", s3)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise InputError(pattern, f"no such folder {store.root}")
    matcher = wcglob.compile(rest, flags=GLOB_FLAGS)

    def matching() -> Iterator[str]:
        for key in store_keys(store, pattern):
            parts = key.split("/")
            if any(matcher.match("/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
                yield key

    return InputListing(pattern, "pattern", store.uri, matching, shown_as=folder_prefix(base))


def list_file_listing(text: str, s3: S3Options | None) -> InputListing:
    """A .txt or .json list of keys, local or on S3; relative entries are read from the
    list's own folder."""
    where = parse_store(text, "INPUT")
    shown_as = folder_prefix(text.rpartition("/")[0])
    if isinstance(where, LocalLocation):
        path = where.path.resolve()
        try:
            check_user_file(path)  # before anything is listed or written
        except FileRefused as refused:
            reason = "no such list file" if refused.kind == "not-found" else refused.reason
            raise InputError(text, reason) from None
        return InputListing(text, "list", str(path.parent), lambda: list_entries(path, text),
                            shown_as=shown_as)
    folder, _, name = where.prefix.rpartition("/")
    store = S3Store(where.bucket, folder, s3)

    def keys() -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="flowerml-list-") as temp:
            local = Path(temp) / name
            try:
                store.get_file(name, local)
            except ObjectNotFound:
                raise InputError(text, "no such list object") from None
            yield from list_entries(local, text)

    return InputListing(text, "list", store.uri, keys, shown_as=shown_as)


def list_entries(path: Path, name: str | None = None) -> Iterator[str]:
    """The keys of a list file, streamed: a JSON array of strings, or one key per line. It is
    read as a file a user named (`flowerml.core.files.open_user_file`: a regular file, at most
    `MAX_LIST_BYTES`), as UTF-8; `name` is how messages call it (the path by default)."""
    name = name or str(path)
    try:
        with open_user_file(path, limit=MAX_LIST_BYTES, what="a list file") as handle:
            if path.suffix.lower() == ".json":
                yield from json_list_entries(handle, name)
            else:
                yield from text_list_entries(handle, name)
    except FileRefused as refused:
        raise InputError(name, refused.reason) from None


def json_list_entries(handle: IO[bytes], name: str) -> Iterator[str]:
    """The strings of a JSON array, parsed a buffer at a time (ijson): a list of millions of
    keys never sits in memory whole."""
    try:
        for prefix, event, value in ijson.parse(handle, use_float=True):
            if prefix == "" and event in ("start_array", "end_array"):
                continue
            if prefix == "":
                raise InputError(name, "not a JSON array of strings (it does not start with "
                                       "'[')")
            if event != "string" or not value.strip():
                got = {"start_map": "an object", "start_array": "an array"}.get(event) or \
                    json.dumps(value, ensure_ascii=False)[:60]
                raise InputError(name, f"entries must be non-empty strings (got {got})")
            yield value.strip()
    except UnicodeDecodeError:  # ijson's Python backends
        raise InputError(name, "not UTF-8 text; save the list as UTF-8") from None
    except ijson.JSONError as error:
        if "UTF8" in str(error):  # yajl's "invalid bytes in UTF8 string"
            raise InputError(name, "not UTF-8 text; save the list as UTF-8") from None
        problem = str(error).strip().splitlines()[0] if str(error).strip() else "not JSON"
        raise InputError(name, f"not a JSON array of strings ({problem})") from None


def text_list_entries(handle: IO[bytes], name: str) -> Iterator[str]:
    for number, raw in enumerate(handle, 1):
        try:
            entry = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError(name, f"line {number} is not UTF-8 text; save the list as "
                                   "UTF-8") from None
        if entry and not entry.startswith("#"):
            yield entry


# --------------------------------------------------------------------------------------------
# Reading one key


class KeyReader:
    """Reads a key's bytes: relative keys from the listing's root, absolute paths from disk,
    s3:// URIs from their bucket, each at most `MAX_IMAGE_BYTES`. A key that is not there, not
    a regular file, too large, or that the credentials may not read is that key's error; a
    store that cannot be reached raises (a shard is worth retrying)."""

    def __init__(self, root: str, s3: S3Options | None = None) -> None:
        self.root = open_store(root, s3=s3, name="INPUT")
        self.s3 = s3
        self._buckets: dict[str, S3Store] = {}
        self._guard = threading.Lock()

    def read(self, key: str) -> bytes:
        try:
            if key.startswith("s3://"):
                bucket, _, name = key.removeprefix("s3://").partition("/")
                return self._bucket(bucket).get_bytes(name, limit=MAX_IMAGE_BYTES)
            if os.path.isabs(key):
                return read_user_file(key, limit=MAX_IMAGE_BYTES, what="an image file")
            return self.root.get_bytes(key, limit=MAX_IMAGE_BYTES)
        except ObjectNotFound:
            raise ImageUnreadable("no such object") from None
        except ObjectTooLarge:
            raise ImageUnreadable(f"larger than {size_text(MAX_IMAGE_BYTES)}, the limit for "
                                  "an image file") from None
        except FileRefused as refused:
            raise ImageUnreadable(refused.reason) from None
        except StoreAccessError as error:  # no credentials, access denied, no such bucket
            raise ImageUnreadable(str(error)) from None
        except ValueError as error:  # an invalid key ('..', empty parts)
            raise ImageUnreadable(str(error)) from None

    def _bucket(self, bucket: str) -> S3Store:
        problem = bucket_name_problem(bucket)
        if problem:
            raise ImageUnreadable(f"invalid bucket name '{bucket}': {problem}")
        with self._guard:
            if bucket not in self._buckets:
                self._buckets[bucket] = S3Store(bucket, "", self.s3)
            return self._buckets[bucket]


# --------------------------------------------------------------------------------------------
# Several INPUTs, one result each (`flowerml predict`)


@dataclass(frozen=True)
class ImageInput:
    """One result to come: `name` as the user will see it, and a local file to read, a
    `fetch` of an object's bytes, or the reason there is none."""

    name: str
    path: Path | None = None
    error: str | None = None
    fetch: Callable[[], bytes] | None = None


def expand_inputs(arguments: Iterable[str | os.PathLike],
                  s3: S3Options | None = None) -> Iterator[ImageInput]:
    """The images each argument names, in argument order. One that cannot be listed (missing,
    not a regular file, an unreadable folder or list), or that names no image, is one input
    with its error, and the next argument goes on."""
    for argument in arguments:
        text = os.fspath(argument)
        try:
            yield from argument_images(text, s3)
        except InputError as error:
            yield ImageInput(text, error=error.reason)
        except UserError as error:  # an S3 prefix or list the credentials may not read
            yield ImageInput(text, error=str(error))


def argument_images(text: str, s3: S3Options | None) -> Iterator[ImageInput]:
    listing = list_input(text, s3)
    reader: KeyReader | None = None  # opened for the first key that is not on this disk
    found = others = 0
    for key in listing.stream():
        if listing.only_images and not is_image_name(key):
            others += 1
            continue
        found += 1
        path = local_path(listing, key)
        if path is None:
            reader = reader or KeyReader(listing.root, s3)
            yield ImageInput(listing.name(key), fetch=partial(reader.read, key))
        else:
            yield ImageInput(listing.name(key), path)
    if not found:
        yield ImageInput(text, error=nothing_listed(listing.kind, others))


def local_path(listing: InputListing, key: str) -> Path | None:
    """Where a key lies on this machine's disk, if it does."""
    if key.startswith("s3://"):
        return None
    if os.path.isabs(key):
        return Path(key)
    return None if listing.root.startswith("s3://") else Path(listing.root, key)


def nothing_listed(kind: InputKind, others: int) -> str:
    if kind == "pattern":
        return "no image matches this pattern" if others else "no file matches this pattern"
    if kind == "list":
        return "no entries in this list file"
    return f"no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"
