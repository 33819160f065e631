"""The plan of a `flowerml score` run: what it scores, with which version and runtime, and
where the results go.

`plan_scoring` checks the request, resolves the alias once (every shard of a run uses the same
version), chooses the runtime, spools INPUT's listing (`flowerml.serving.scoring_spool`), and writes
the shards' key files, then `_listing.json`, under `<model>/<NNNNNN>/<input-id>/` of the output
store. An output an earlier run started is resumed with that run's runtime and top-k, or
refused when the request asks for others. Every refusal comes before the first write.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict

from flowerml.core.documents import DocumentError, StoredDocument, plain, read_document
from flowerml.core.errors import UserError
from flowerml.evaluation.drift import DEFAULT_DRIFT_THRESHOLD
from flowerml.io.storage import (
    ObjectNotFound,
    PreconditionFailed,
    S3Options,
    Store,
    StoreAccessError,
)
from flowerml.registry.names import parse_model_ref
from flowerml.registry.versions import Registry
from flowerml.serving import runtimes
from flowerml.serving.inputs import list_input
from flowerml.serving.runtimes import RuntimeRefused
from flowerml.serving.scoring_spool import LISTING_FORMAT, Spooled, spool_listing, spooled_shards

Runtime = Literal["auto", "onnx", "onnx-int8", "torch"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_TOP_K = 5

LISTING = "_listing.json"
SHARDS = "_shards"


class ScoringError(UserError):
    """Bad scoring input: options, an input without images, an output that cannot be written,
    a runtime the version cannot run, or an output started with other settings."""


class DamagedScoringDocument(DocumentError, ScoringError):
    """A `_listing.json` or `_shards/NNNNN.json` that does not read as its model."""


class ScoringListing(StoredDocument):
    """`<model>/<NNNNNN>/<input-id>/_listing.json`, written create-only after the shards it
    lists: what was listed and the settings every later run on this output must share."""

    format: int
    input: str
    root: str
    input_id: str
    images: int
    shards: int
    shard_size: int
    model: str
    version: int
    runtime: str
    top_k: int


class ScoringShard(StoredDocument):
    """`<model>/<NNNNNN>/<input-id>/_shards/NNNNN.json`: the keys of shard N, in listing
    order."""

    shard: int
    keys: list[str]


class OutputNotWritable(ScoringError):
    """--output refuses writes (its folder's permissions, a read-only key)."""

    kind = "denied"


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
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    review_below: float | None = None

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
        if not is_number(self.drift_threshold) or self.drift_threshold < 0:
            raise ScoringError("--drift-threshold must be a population stability index of at "
                               f"least 0 (got {self.drift_threshold!r})")
        if self.review_below is not None and not (is_number(self.review_below)
                                                  and 0 < self.review_below <= 1):
            raise ScoringError("--review-below must be a probability above 0 and at most 1 "
                               f"(got {self.review_below!r})")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class ScoringPlan(ScoringListing):
    """A run's resolved plan, small and JSON-able (it travels to every shard task): the
    listing it writes (or found) and what the shards need besides."""

    model_config = ConfigDict(frozen=True)

    sha256: str  # of the file the runtime runs: model.onnx, model.int8.onnx or model.safetensors
    weights_sha256: str
    batch_size: int
    registry: str  # the registry's store URI
    output: str  # the output store's URI
    prefix: str  # <model>/<NNNNNN>/<input-id>
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD  # judged when _SUCCESS.json is written
    review_below: float | None = None  # review.jsonl's threshold; None: no review.jsonl

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def part_key(self, shard: int) -> str:
        return self.key(f"part-{shard:05d}.jsonl")

    def shard_key(self, shard: int) -> str:
        return self.key(f"{SHARDS}/{shard:05d}.json")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ScoringPlan:
        return cls.model_validate(value)

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version:06d}"


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
            format=LISTING_FORMAT, input=request.input, root=listing.root, input_id=spooled.digest[:16],
            images=spooled.count, shards=-(-spooled.count // request.shard_size),
            shard_size=request.shard_size, model=model, version=version, runtime=runtime,
            sha256=sha, weights_sha256=registry.get(version).weights_sha256,
            top_k=request.top_k, batch_size=request.batch_size, registry=registry_store.uri,
            output=output_store.uri, prefix=prefix, drift_threshold=request.drift_threshold,
            review_below=request.review_below)
        if started is None:
            check_writable(output_store, request.output)
            write_shards(output_store, plan, spooled, request.output)
    return plan


def resume_settings(started: ScoringListing, request: ScoringRequest, registry: Registry,
                    version: int, chosen: tuple[str, str], where: str) -> tuple[str, str]:
    """The runtime (and its file's sha256) for an output that an earlier run started: that
    run's, so that every part of one output comes from one runtime and one top-k."""
    if started.top_k != request.top_k:
        raise ScoringError(f"{where} was started with --top-k {started.top_k}: use the "
                           "same, or another --output")
    if started.runtime == chosen[0]:
        return chosen
    if request.runtime != "auto":
        raise ScoringError(f"{where} was started with --runtime {started.runtime}: use the "
                           "same, or another --output")
    return choose_runtime(registry, version, started.runtime)


def nested_prefix(root: str, output: str) -> str | None:
    """The output's key prefix below the input's root, when it lies inside it (a re-run must
    not score its own results)."""
    root = root.rstrip("/") + "/"
    return output.removeprefix(root).rstrip("/") + "/" if output.startswith(root) else None


def choose_runtime(registry: Registry, version: int, requested: str) -> tuple[str, str]:
    """`flowerml.serving.runtimes.choose_runtime`, its refusal a `ScoringError`."""
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
            yield plan.shard_key(index), json.dumps(plain(ScoringShard(shard=index,
                                                                       keys=keys))).encode()

    try:
        output_store.upload_many(shard_files())
    except StoreAccessError as error:
        raise OutputNotWritable(f"--output {output} is not writable: {error}") from None
    record = ScoringListing(**plan.model_dump(include=set(ScoringListing.model_fields)))
    try:
        output_store.put_bytes(plan.key(LISTING), json.dumps(plain(record), indent=2).encode(),
                               if_none_match=True)
    except PreconditionFailed:  # a concurrent run listed it first: its settings stand
        theirs = read_listing(output_store, plan.prefix, output) or record
        if (theirs.runtime, theirs.top_k) != (plan.runtime, plan.top_k):
            raise ScoringError(f"{output_store.location(plan.prefix)} was just started by "
                               f"another run with --runtime {theirs.runtime} --top-k "
                               f"{theirs.top_k}: use the same, or another --output") \
                from None


def read_listing(output_store: Store, prefix: str, output: str) -> ScoringListing | None:
    """The record of an earlier run on this output, validated; None when there is none. A
    damaged one is one line naming the file and field, and what to do."""
    key = f"{prefix}/{LISTING}"
    try:
        raw = output_store.get_bytes(key)
    except ObjectNotFound:
        return None
    except StoreAccessError as error:
        raise ScoringError(f"--output {output}: {error}") from None
    try:
        return read_document(ScoringListing, raw, output_store.location(key),
                             DamagedScoringDocument)
    except DamagedScoringDocument as damaged:
        raise DamagedScoringDocument(f"{damaged}: remove that folder, or use another "
                                     "--output") from None


def read_shard(output_store: Store, plan: ScoringPlan, shard: int) -> list[str]:
    """The keys of shard `shard`, validated (DamagedScoringDocument naming file and field)."""
    key = plan.shard_key(shard)
    return read_document(ScoringShard, output_store.get_bytes(key), output_store.location(key),
                         DamagedScoringDocument).keys
