"""Batch scoring: a registry version's top-k flowers for every image of a collection, in shards.

INPUT is a local folder, an `s3://bucket/prefix`, a glob over either (`photos/**/*.jpg`,
`s3://bucket/photos/*.jpg`), or a list file (`.txt`: one key per line, `#` comments; `.json`: an
array of strings), local or on S3, whose entries are paths or keys relative to the list's own
folder, absolute paths, or `s3://` URIs. A folder, a glob or a prefix gives the files named like
images (the suffixes `flowerml predict` looks for in a folder); a list's entries are all scored,
and one that is not an image is that key's error row. It is listed once, streamed (never held
in memory), into numbered shards of `shard_size` keys; each shard is scored on its own (a Prefect task, or
a thread of `flowerml score`), one shard in memory at a time. Everything goes under the output
store (a folder or an `s3://` prefix):

```
<model>/<NNNNNN>/<input-id>/_shards/NNNNN.json  the keys of shard N (written before any part)
<model>/<NNNNNN>/<input-id>/_listing.json       the listing's record, after its shards: input,
                                                root, counts, shard size, runtime, top-k
<model>/<NNNNNN>/<input-id>/part-NNNNN.jsonl    one row per key of shard N, in listing order:
                                                {"key", "labels", "names", "probabilities"}
                                                or {"key", "error"}; create-only
<model>/<NNNNNN>/<input-id>/_SUCCESS.json       written LAST, create-only: counts, failures,
                                                model version and sha256, runtime, seconds
```

`<input-id>` is a content hash of the listing (its root, shard size and every key, in order),
so scoring the same collection with the same version again lands in the same folder and skips
every shard whose part exists: a killed run resumes, and two runs on one output never corrupt
each other (a part is written whole, once; the loser of a race keeps the winner's). An image
that cannot be read or decoded is a row with its error, never a failed shard: a missing key, a
key the credentials may not read, a FIFO or a device (refused before it is opened, so nothing
blocks or reads forever), a file over `MAX_IMAGE_BYTES`. The alias is
resolved once, when the run starts, so every shard of a run uses the same version.

Runtimes: `onnx` runs the version's ONNX export (it must have passed parity, and its sha256 is
verified before it runs), `torch` runs the safetensors weights (sha-verified) in eager mode,
`auto` picks onnx when a passing export exists. Both take the export's input contract: uint8
RGB pixels, the short side resized to round(S*256/224) and the centre S x S cropped; a large
JPEG is decoded reduced first (`flowerml.prediction.open_image`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal, get_args

import numpy as np

from flowerml import runtimes
from flowerml.errors import UserError
from flowerml.files import (
    FileRefused,
    check_user_file,
    open_user_file,
    read_user_file,
    size_text,
)
from flowerml.locations import LocalLocation, bucket_name_problem, parse_store
from flowerml.prediction import IMAGE_SUFFIXES, MAX_IMAGE_BYTES
from flowerml.registry import Registry
from flowerml.registry_names import parse_model_ref
from flowerml.runtimes import RuntimeRefused, Scorer, load_scorer, softmax_top_k
from flowerml.storage import (
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    S3Options,
    Store,
    StoreAccessError,
)
from flowerml.storage_local import LocalStore
from flowerml.storage_open import open_store
from flowerml.storage_s3 import S3Store

Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_TOP_K = 5
LIST_SUFFIXES = (".txt", ".json")
MAX_LIST_BYTES = 2 * 2**30
"""The largest list file read (some 20 million keys): a list is streamed, so the cap only ends
a file that never ends."""
LISTED_FAILURES = 100
"""How many failed rows `_SUCCESS.json` names (the parts hold every one)."""
LISTING_FORMAT = 1
"""Part of every input id: bumped if the shard layout changes, so old outputs are not reused."""

LISTING = "_listing.json"
SUCCESS = "_SUCCESS.json"
SHARDS = "_shards"


class ScoringError(UserError):
    """Bad scoring input: options, an input without images, an output that cannot be written,
    a runtime the version cannot run, or an output started with other settings."""


class OutputNotWritable(ScoringError):
    """--output refuses writes (its folder's permissions, a read-only key)."""

    kind = "denied"


class ImageUnreadable(Exception):
    """One key that cannot be scored; its message goes in the key's row."""


# --------------------------------------------------------------------------------------------
# Listing the input


@dataclass(frozen=True)
class InputListing:
    """What INPUT names: where relative keys are read from (`root`, a folder path or an
    s3:// URI) and the keys, streamed in a fixed order. `only_images`: the keys of a folder,
    glob or prefix, of which only those named like images are scored (a list's are all)."""

    root: str
    stream: Callable[[], Iterator[str]]
    only_images: bool = False


def is_pattern(text: str) -> bool:
    return any(character in text for character in "*?[")


def list_input(text: str, s3: S3Options | None = None) -> InputListing:
    """INPUT as a listing (nothing is read until its keys are iterated); one image file named
    on its own is a listing of one."""
    if not text.strip():
        raise ScoringError("INPUT must not be empty")
    local = not text.startswith(("s3://", "file://"))
    path = os.path.expanduser(text) if local else text
    if text.lower().endswith(LIST_SUFFIXES) and not (local and os.path.isdir(path)):
        return list_file_listing(text, s3)
    if is_pattern(text) and not (local and os.path.lexists(path)):
        return glob_listing(text, s3)
    if local and os.path.isfile(path):
        image = Path(path).resolve()
        return InputListing(str(image.parent), lambda: iter([image.name]))
    if local and os.path.lexists(path) and not os.path.isdir(path):
        try:
            check_user_file(path)  # a FIFO, a device, a broken link: say which
        except FileRefused as refused:
            if refused.kind != "not-found":
                raise ScoringError(f"INPUT {text}: {refused.reason}") from None
    if local and not os.path.isdir(path):
        raise ScoringError(f"INPUT {text}: no such folder or file")
    store = open_input_store(text, s3)
    return InputListing(store.uri, lambda: store_keys(store), only_images=True)


def open_input_store(uri: str, s3: S3Options | None) -> Store:
    return open_store(uri, s3=s3, name="INPUT")


def store_keys(store: Store) -> Iterator[str]:
    """Every key below a store's root, streamed in a fixed order: S3's listing pages, or a
    folder walked one directory at a time (sorted, hidden names skipped, as LocalStore lists),
    so a folder of millions of files is never held in memory."""
    if isinstance(store, LocalStore):
        yield from walk_sorted(store.root, "")
    else:
        yield from (info.key for info in store.list(""))


def walk_sorted(folder: Path, prefix: str) -> Iterator[str]:
    """The files below `folder`, depth first, each directory's names sorted; only one
    directory's names are held at a time (per level of depth)."""
    try:
        with os.scandir(folder) as scan:
            # Symlinked folders are not followed (a link loop would never end), as os.walk.
            names = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan
                           if not entry.name.startswith(".")
                           and (entry.is_dir(follow_symlinks=False) or entry.is_file()))
    except OSError as error:
        raise ScoringError(f"INPUT: cannot read folder {folder}: "
                           f"{error.strerror or error}") from None
    for name, is_dir in names:
        if is_dir:
            yield from walk_sorted(folder / name, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}"


def glob_listing(pattern: str, s3: S3Options | None) -> InputListing:
    """A glob over a folder or an S3 prefix: the part before the first wildcard's folder is
    listed, and keys are matched against the rest (`*` and `?` stay within one folder, `**/`
    spans any number of them)."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    base, _, _ = head.rpartition("/")
    rest = pattern[len(base) + 1:] if base else pattern
    if not base and pattern.startswith("/"):
        base, rest = "/", pattern[1:]
    if base.endswith(":/") or base == "s3:":
        raise ScoringError(f"INPUT {pattern}: a pattern needs a bucket or folder before its "
                           "first wildcard")
    store = open_input_store(base or ".", s3)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise ScoringError(f"INPUT {pattern}: no such folder {store.root}")
    matcher = glob_regex(rest)
    return InputListing(store.uri, lambda: (key for key in store_keys(store)
                                            if matcher.fullmatch(key)), only_images=True)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regular expression over '/'-separated keys."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def list_file_listing(text: str, s3: S3Options | None) -> InputListing:
    """A .txt or .json list of keys, local or on S3; relative entries are read from the
    list's own folder."""
    where = parse_store(text, "INPUT")
    if isinstance(where, LocalLocation):
        path = where.path.resolve()
        try:
            check_user_file(path)  # before anything is listed or written
        except FileRefused as refused:
            reason = "no such list file" if refused.kind == "not-found" else refused.reason
            raise ScoringError(f"INPUT {text}: {reason}") from None
        return InputListing(str(path.parent), lambda: list_entries(path, text))
    folder, _, name = where.prefix.rpartition("/")
    store = S3Store(where.bucket, folder, s3)
    root = store.uri

    def keys() -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="flowerml-list-") as temp:
            local = Path(temp) / name
            try:
                store.get_file(name, local)
            except ObjectNotFound:
                raise ScoringError(f"INPUT {text}: no such list object") from None
            yield from list_entries(local, text)

    return InputListing(root, keys)


def list_entries(path: Path, name: str | None = None) -> Iterator[str]:
    """The keys of a list file, streamed: a JSON array of strings, or one key per line. It is
    read as a file a user named (`flowerml.files.open_user_file`: a regular file, at most
    `MAX_LIST_BYTES`), as UTF-8; `name` is how messages call it (the path by default)."""
    name = name or str(path)
    try:
        with open_user_file(path, limit=MAX_LIST_BYTES, what="a list file") as handle:
            if path.suffix.lower() == ".json":
                yield from json_list_entries(handle, name)
            else:
                yield from text_list_entries(handle, name)
    except FileRefused as refused:
        raise ScoringError(f"INPUT {name}: {refused.reason}") from None


def json_list_entries(handle: IO[bytes], name: str) -> Iterator[str]:
    text = io.TextIOWrapper(handle, encoding="utf-8")
    try:
        for entry in iter_json_array(text, name):
            if not isinstance(entry, str) or not entry.strip():
                raise ScoringError(f"INPUT {name}: entries must be non-empty strings "
                                   f"(got {json.dumps(entry)[:60]})")
            yield entry.strip()
    except UnicodeDecodeError:
        raise ScoringError(f"INPUT {name}: not UTF-8 text; save the list as UTF-8") from None
    finally:
        text.detach()  # the handle is closed by its owner


def text_list_entries(handle: IO[bytes], name: str) -> Iterator[str]:
    for number, raw in enumerate(handle, 1):
        try:
            entry = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ScoringError(f"INPUT {name}: line {number} is not UTF-8 text; save the list "
                               "as UTF-8") from None
        if entry and not entry.startswith("#"):
            yield entry


def iter_json_array(handle: IO[str], name: str, chunk: int = 1 << 16) -> Iterator[Any]:
    """The items of a JSON array, read a chunk at a time: a list of millions of keys never
    sits in memory whole."""
    decoder = json.JSONDecoder()
    buffer, position, eof = "", 0, False

    def bad(what: str) -> ScoringError:
        return ScoringError(f"INPUT {name}: not a JSON array of strings ({what})")

    def read_more() -> None:
        nonlocal buffer, position, eof
        more = handle.read(chunk)
        eof = not more
        buffer, position = buffer[position:] + more, 0

    def next_char() -> str:
        """The next character that is not white space, consumed ('' at the end)."""
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position].isspace():
                position += 1
            if position < len(buffer):
                position += 1
                return buffer[position - 1]
            if eof:
                return ""
            read_more()

    if next_char() != "[":
        raise bad("it does not start with '['")
    mark = next_char()
    while mark != "]":
        if not mark:
            raise bad("it ends before ']'")
        position -= 1  # back to the item's first character
        while True:
            try:
                item, end = decoder.raw_decode(buffer, position)
                if end < len(buffer) or eof:  # not cut by the chunk's end
                    position = end
                    break
            except json.JSONDecodeError as error:
                if eof:
                    raise bad(error.msg) from None
            read_more()
        yield item
        mark = next_char()
        if mark == ",":
            mark = next_char()
            if mark in ("]", ""):
                raise bad("a ',' before ']'" if mark else "it ends before ']'")
        elif mark != "]":
            raise bad("expected ',' or ']'" if mark else "it ends before ']'")
    if next_char():
        raise bad("text after ']'")


@dataclass(frozen=True)
class Spooled:
    """The listing written to a local file, one JSON-encoded key per line, and its hash;
    `skipped` counts the files of a folder, glob or prefix not named like images."""

    path: Path
    count: int
    images: int
    digest: str
    skipped: int = 0


def spool_listing(listing: InputListing, shard_size: int, folder: Path,
                  exclude: str | None = None) -> Spooled:
    """Stream the keys to disk once, hashing them (with the root and shard size, which decide
    what each shard holds) and counting those named like images. Keys under `exclude` (an
    output folder inside the input) are left out, and so are a folder's, glob's or prefix's
    files not named like images (`InputListing.only_images`)."""
    digest = hashlib.sha256(f"flowerml-listing-v{LISTING_FORMAT}\n{listing.root}\n"
                            f"{shard_size}\n".encode())
    path, count, images, skipped = folder / "listing.jsonl", 0, 0, 0
    with open(path, "w", encoding="utf-8") as spool:
        for key in listing.stream():
            if exclude and key.startswith(exclude):
                continue
            is_image = key.lower().endswith(IMAGE_SUFFIXES)
            if listing.only_images and not is_image:
                skipped += 1
                continue
            line = json.dumps(key) + "\n"
            spool.write(line)
            digest.update(line.encode())
            count += 1
            images += is_image
    return Spooled(path, count, images, digest.hexdigest(), skipped)


def spooled_shards(spooled: Spooled, shard_size: int) -> Iterator[list[str]]:
    with open(spooled.path, encoding="utf-8") as spool:
        while lines := list(islice(spool, shard_size)):
            yield [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------------
# The plan: what a run scores, with what, and where the results go


@dataclass(frozen=True)
class ScoringRequest:
    """What the user asked for (the CLI's and the flow's parameters)."""

    input: str
    model: str
    output: str
    runtime: Runtime = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    top_k: int = DEFAULT_TOP_K

    def check(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ScoringError(f"--runtime must be one of {', '.join(RUNTIMES)}: got "
                               f"{self.runtime!r}")
        for option, value in (("--batch-size", self.batch_size),
                              ("--shard-size", self.shard_size), ("--top-k", self.top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScoringError(f"{option} must be a whole number of at least 1 "
                                   f"(got {value!r})")
        if not self.output.strip():
            raise ScoringError("--output must not be empty")


@dataclass(frozen=True)
class ScoringPlan:
    """A run's resolved plan, small and JSON-able (it travels to every shard task)."""

    input: str
    root: str
    input_id: str
    images: int
    shards: int
    shard_size: int
    model: str
    version: int
    runtime: str
    sha256: str  # of the file the runtime runs: model.onnx or model.safetensors
    weights_sha256: str
    top_k: int
    batch_size: int
    registry: str  # the registry's store URI
    output: str  # the output store's URI
    prefix: str  # <model>/<NNNNNN>/<input-id>

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version:06d}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def part_key(self, shard: int) -> str:
        return self.key(f"part-{shard:05d}.jsonl")

    def shard_key(self, shard: int) -> str:
        return self.key(f"{SHARDS}/{shard:05d}.json")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ScoringPlan:
        return cls(**value)


def plan_scoring(request: ScoringRequest, *, registry_store: Store, output_store: Store,
                 s3: S3Options | None = None) -> ScoringPlan:
    """Check the request, resolve the version and runtime, list INPUT into shards on the
    output store. Every refusal comes before the first write."""
    request.check()
    model, alias, number = parse_model_ref(request.model)
    registry = Registry(registry_store, model)
    version = registry.resolve(alias, number).version
    runtime, sha = choose_runtime(registry, version, request.runtime)
    listing = list_input(request.input, s3)
    with tempfile.TemporaryDirectory(prefix="flowerml-score-") as temp:
        spooled = spool_listing(listing, request.shard_size, Path(temp),
                                exclude=nested_prefix(listing.root, output_store.uri))
        if spooled.images == 0:
            others = spooled.count + spooled.skipped
            found = f"{others} other files" if others else "nothing listed"
            raise ScoringError(f"INPUT {request.input}: no images there ({found}; looked for "
                               ".jpg, .jpeg, .png, ...)")
        prefix = f"{model}/{version:06d}/{spooled.digest[:16]}"
        started = read_listing(output_store, prefix, request.output)
        if started is not None:
            runtime, sha = resume_settings(started, request, registry, version, (runtime, sha),
                                           output_store.location(prefix))
        plan = ScoringPlan(
            input=request.input, root=listing.root, input_id=spooled.digest[:16],
            images=spooled.count, shards=-(-spooled.count // request.shard_size),
            shard_size=request.shard_size, model=model, version=version, runtime=runtime,
            sha256=sha, weights_sha256=registry.get(version).weights_sha256,
            top_k=request.top_k, batch_size=request.batch_size, registry=registry_store.uri,
            output=output_store.uri, prefix=prefix)
        if started is None:
            check_writable(output_store, request.output)
            write_shards(output_store, plan, spooled, request.output)
    return plan


def resume_settings(started: dict[str, Any], request: ScoringRequest, registry: Registry,
                    version: int, chosen: tuple[str, str], where: str) -> tuple[str, str]:
    """The runtime (and its file's sha256) for an output that an earlier run started: that
    run's, so that every part of one output comes from one runtime and one top-k."""
    if started["top_k"] != request.top_k:
        raise ScoringError(f"{where} was started with --top-k {started['top_k']}: use the "
                           "same, or another --output")
    if started["runtime"] == chosen[0]:
        return chosen
    if request.runtime != "auto":
        raise ScoringError(f"{where} was started with --runtime {started['runtime']}: use the "
                           "same, or another --output")
    return choose_runtime(registry, version, started["runtime"])


def nested_prefix(root: str, output: str) -> str | None:
    """The output's key prefix below the input's root, when it lies inside it (a re-run must
    not score its own results)."""
    root = root.rstrip("/") + "/"
    return output.removeprefix(root).rstrip("/") + "/" if output.startswith(root) else None


def choose_runtime(registry: Registry, version: int, requested: str) -> tuple[str, str]:
    """`flowerml.runtimes.choose_runtime`, its refusal a `ScoringError`."""
    try:
        return runtimes.choose_runtime(registry, version, requested)
    except RuntimeRefused as error:
        raise ScoringError(str(error)) from None


def check_writable(output_store: Store, output: str) -> None:
    try:
        output_store.check()
    except StoreAccessError as error:
        raise OutputNotWritable(f"--output {output} is not writable: {error}") from None


def write_shards(output_store: Store, plan: ScoringPlan, spooled: Spooled, output: str) -> None:
    """Every shard's keys, then `_listing.json`: a listing record means its shards are
    there. Shards are deterministic, so a concurrent run writing the same bytes is harmless."""
    def shard_files() -> Iterator[tuple[str, bytes]]:
        for index, keys in enumerate(spooled_shards(spooled, plan.shard_size)):
            yield plan.shard_key(index), json.dumps({"shard": index, "keys": keys}).encode()

    try:
        output_store.upload_many(shard_files())
    except StoreAccessError as error:
        raise OutputNotWritable(f"--output {output} is not writable: {error}") from None
    record = {"format": LISTING_FORMAT, "input": plan.input, "root": plan.root,
              "input_id": plan.input_id, "images": plan.images, "shards": plan.shards,
              "shard_size": plan.shard_size, "model": plan.model, "version": plan.version,
              "runtime": plan.runtime, "top_k": plan.top_k}
    try:
        output_store.put_bytes(plan.key(LISTING), json.dumps(record, indent=2).encode(),
                               if_none_match=True)
    except PreconditionFailed:  # a concurrent run listed it first: its settings stand
        theirs = read_listing(output_store, plan.prefix, output) or record
        if (theirs["runtime"], theirs["top_k"]) != (plan.runtime, plan.top_k):
            raise ScoringError(f"{output_store.location(plan.prefix)} was just started by "
                               f"another run with --runtime {theirs['runtime']} --top-k "
                               f"{theirs['top_k']}: use the same, or another --output") \
                from None


def read_listing(output_store: Store, prefix: str, output: str) -> dict[str, Any] | None:
    """The record of an earlier run on this output, if any."""
    try:
        return json.loads(output_store.get_bytes(f"{prefix}/{LISTING}"))
    except ObjectNotFound:
        return None
    except StoreAccessError as error:
        raise ScoringError(f"--output {output}: {error}") from None
    except ValueError:
        raise ScoringError(f"{output_store.location(f'{prefix}/{LISTING}')} is not valid "
                           "JSON: remove that folder, or use another --output") from None


def read_shard(output_store: Store, plan: ScoringPlan, shard: int) -> list[str]:
    return json.loads(output_store.get_bytes(plan.shard_key(shard)))["keys"]


# --------------------------------------------------------------------------------------------
# Reading and decoding one key


class KeyReader:
    """Reads a key's bytes: relative keys from the listing's root, absolute paths from disk,
    s3:// URIs from their bucket, each at most `MAX_IMAGE_BYTES`. A key that is not there, not
    a regular file, too large, or that the credentials may not read is that key's error; a
    store that cannot be reached fails the shard (it is worth retrying)."""

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


def load_pixels(reader: KeyReader, key: str, image_size: int) -> np.ndarray | str:
    """A key's pixels, or why it has none."""
    from flowerml.prediction import ImageError, image_pixels

    try:
        return image_pixels(io.BytesIO(reader.read(key)), image_size)
    except (ImageUnreadable, ImageError) as error:
        return str(error)


# --------------------------------------------------------------------------------------------
# The model, once per process


_scorers: dict[tuple, Scorer] = {}
_scorers_guard = threading.Lock()


def cached_scorer(registry_store: Store, plan: ScoringPlan, threads: int | None) -> Scorer:
    """The plan's model for this process, loaded (and verified) once; a process keeps one
    model, so a worker that moves on to another version frees the last."""
    key = (registry_store.uri, plan.model, plan.version, plan.runtime, plan.sha256, threads)
    with _scorers_guard:
        if key not in _scorers:
            _scorers.clear()
            _scorers[key] = load_scorer(Registry(registry_store, plan.model), plan.version,
                                        plan.runtime, plan.sha256, threads)
        return _scorers[key]


# --------------------------------------------------------------------------------------------
# Scoring a shard


@dataclass
class ShardResult:
    """What one shard's part holds; `skipped` when an earlier or concurrent run wrote it."""

    shard: int
    images: int
    failed: int
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ShardResult:
        return cls(**value)


def score_rows(scorer: Scorer, reader: KeyReader, keys: list[str], *, batch_size: int,
               top_k: int, decode_threads: int = 2) -> Iterator[dict[str, Any]]:
    """One row per key, in order; the next batch decodes while this one runs."""
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    top_k = min(top_k, len(scorer.class_names))
    with ThreadPoolExecutor(max(decode_threads, 1), thread_name_prefix="flowerml-decode") \
            as pool:
        def decode(batch: list[str]) -> list[Future | np.ndarray | str]:
            if decode_threads < 1:  # everything on this thread (the per-core benchmark)
                return [load_pixels(reader, key, scorer.image_size) for key in batch]
            return [pool.submit(load_pixels, reader, key, scorer.image_size) for key in batch]

        upcoming = decode(batches[0]) if batches else []
        for index, batch in enumerate(batches):
            current = upcoming
            if index + 1 < len(batches):
                upcoming = decode(batches[index + 1])
            decoded = [item.result() if isinstance(item, Future) else item for item in current]
            yield from ranked_rows(scorer, batch, decoded, top_k)


def ranked_rows(scorer: Scorer, keys: list[str], decoded: list[np.ndarray | str],
                top_k: int) -> Iterator[dict[str, Any]]:
    images = [d for d in decoded if isinstance(d, np.ndarray)]
    ranked = iter(top_k_rows(scorer, np.stack(images), top_k) if images else [])
    for key, item in zip(keys, decoded, strict=True):
        yield {"key": key, **next(ranked)} if isinstance(item, np.ndarray) else \
            {"key": key, "error": item}


def top_k_rows(scorer: Scorer, pixels: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    return [{"labels": [i + 1 for i in indices],
             "names": [scorer.class_names[i] for i in indices],
             "probabilities": [round(p, 6) for p in probabilities]}
            for indices, probabilities in softmax_top_k(scorer, pixels, top_k)]


def score_shard(plan: ScoringPlan, shard: int, *, registry_store: Store, output_store: Store,
                s3: S3Options | None = None, threads: int | None = None,
                decode_threads: int = 2) -> ShardResult:
    """Score one shard into its part, unless a part is there already."""
    if not 0 <= shard < plan.shards:
        raise ScoringError(f"shard {shard} is outside 0-{plan.shards - 1}")
    part = plan.part_key(shard)
    if output_store.exists(part):
        return summarise_part(output_store, plan, shard)
    started = time.perf_counter()
    keys = read_shard(output_store, plan, shard)
    scorer = cached_scorer(registry_store, plan, threads)
    rows = list(score_rows(scorer, KeyReader(plan.root, s3), keys, batch_size=plan.batch_size,
                           top_k=plan.top_k, decode_threads=decode_threads))
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    try:
        output_store.put_bytes(part, data, if_none_match=True)
    except PreconditionFailed:  # a concurrent run finished this shard first: keep its part
        return summarise_part(output_store, plan, shard)
    return shard_result(shard, rows, time.perf_counter() - started)


def shard_result(shard: int, rows: Iterable[dict[str, Any]], seconds: float = 0.0,
                 skipped: bool = False) -> ShardResult:
    images, failures = 0, []
    for row in rows:
        images += 1
        if "error" in row:
            failures.append({"key": row["key"], "error": row["error"]})
    return ShardResult(shard, images, len(failures), failures[:LISTED_FAILURES], skipped,
                       round(seconds, 3))


def summarise_part(output_store: Store, plan: ScoringPlan, shard: int) -> ShardResult:
    text = output_store.get_bytes(plan.part_key(shard)).decode()
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return shard_result(shard, rows, skipped=True)


# --------------------------------------------------------------------------------------------
# Finishing a run


def read_success(output_store: Store, plan: ScoringPlan) -> dict[str, Any] | None:
    try:
        return json.loads(output_store.get_bytes(plan.key(SUCCESS)))
    except ObjectNotFound:
        return None


def finish_scoring(plan: ScoringPlan, results: Iterable[ShardResult], output_store: Store,
                   seconds: float) -> dict[str, Any]:
    """Write `_SUCCESS.json` once every shard's part is there; returns it (or the one a
    concurrent run wrote first)."""
    by_shard = {r.shard: r for r in results}
    parts = {info.key for info in output_store.list(plan.key("part-"))}
    missing = [s for s in range(plan.shards) if s not in by_shard or plan.part_key(s) not in parts]
    if missing:
        raise ScoringError(f"{len(missing)} shards of {output_store.location(plan.prefix)} "
                           f"have no part (first: {missing[0]}): run again to finish them")
    ordered = [by_shard[s] for s in range(plan.shards)]
    failures = [f for r in ordered for f in r.failures][:LISTED_FAILURES]
    failed = sum(r.failed for r in ordered)
    success = {
        "input": plan.input, "root": plan.root, "input_id": plan.input_id,
        "model": plan.model, "version": plan.version, "label": plan.label,
        "runtime": plan.runtime, "sha256": plan.sha256, "weights_sha256": plan.weights_sha256,
        "images": sum(r.images for r in ordered), "scored": sum(r.images - r.failed
                                                               for r in ordered),
        "failed": failed, "failures": failures, "failures_listed": len(failures),
        "shards": plan.shards, "shard_size": plan.shard_size,
        "shards_skipped": sum(r.skipped for r in ordered), "top_k": plan.top_k,
        "batch_size": plan.batch_size, "seconds": round(seconds, 3),
        "output": output_store.location(plan.prefix),
        "parts": [plan.part_key(s).rsplit("/", 1)[1] for s in range(plan.shards)],
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        output_store.put_bytes(plan.key(SUCCESS), json.dumps(success, indent=2).encode(),
                               if_none_match=True)
    except PreconditionFailed:  # a concurrent run finished first: its record stands
        return read_success(output_store, plan) or success
    return success


# --------------------------------------------------------------------------------------------
# One process (the CLI)


def score_collection(request: ScoringRequest, *, registry_store: Store, output_store: Store,
                     s3: S3Options | None = None, parallel: int = 1,
                     threads: int | None = None,
                     on_shard: Callable[[ScoringPlan, ShardResult], None] | None = None
                     ) -> dict[str, Any]:
    """Plan, score every shard on a pool of `parallel` threads in this process, finish.
    A finished output is returned as it is (`already_complete`)."""
    started = time.monotonic()
    plan = plan_scoring(request, registry_store=registry_store, output_store=output_store,
                        s3=s3)
    done = read_success(output_store, plan)
    if done is not None:
        return {**done, "already_complete": True}

    def run(shard: int) -> ShardResult:
        result = score_shard(plan, shard, registry_store=registry_store,
                             output_store=output_store, s3=s3, threads=threads)
        if on_shard:
            on_shard(plan, result)
        return result

    pool = ThreadPoolExecutor(max(parallel, 1), thread_name_prefix="flowerml-shard")
    try:
        results = list(pool.map(run, range(plan.shards)))
    except BaseException:
        # Ctrl-C or a failed shard: start no more shards (finished parts stay for the re-run).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return finish_scoring(plan, results, output_store, time.monotonic() - started)
