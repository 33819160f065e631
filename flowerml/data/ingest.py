"""Ingest: the three source files onto the store, then the official split as ImageFolder trees.

Two steps, each safe to repeat and to interrupt (the pieces they use: `flowerml.data.source_files`
brings each file from its source and checks it, `flowerml.data.raw_mirror` keeps the store's raw/
copy and the local one, `flowerml.data.archive_survey` reads the archive once):

1. `fetch_sources` materialises the files from a source (the official site, a mirror URL, a
   local folder or an s3:// prefix), checks what they are (gzip, .mat, not an HTML page), their
   MD5s when verifying, the .mat consistency and the archive's members, and only then mirrors them
   to `datasets/<name>/raw/` with a `sources.json` record written last.
2. `publish_split` surveys the archive (sha256 and a decode check of every image), refuses
   train/valid/test leakage, derives the content-addressed version, uploads the images that are
   not there yet, byte-identical to the archive, then `quarantine.json`, `manifest.json` last of
   the version, then `CURRENT` (both written by `flowerml.data.manifest`, which owns their shape).
   An archive `flowerml synth` drew (its imagelabels.mat carries the marker) is published as
   synthetic; the result names the version in full and the version CURRENT named before.
   `publish_version` is that publishing, the one path every dataset's version takes (a
   dataset of one's own classes too: `flowerml.data.imagefolder`).

A step that fails removes the empty folders it left on a local store, so a refused source or a
failed upload leaves nothing that looks like a dataset. Both steps first probe that the store
takes writes (`Store.check_writable`), so a read-only credential is refused before any work.
A version is published by one ingest at a time (`Store.writing_under`); on a local store the
temp files of an ingest killed mid-upload are removed when the next one starts on the version
(a stop by SIGTERM or Ctrl-C removes its own on the way out).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from inspect import signature
from pathlib import Path
from typing import Any

from flowerml.core.errors import DataError, DatasetNotFound, LeakageError, SourceError
from flowerml.core.progress import NullProgress, Progress
from flowerml.data import flowers
from flowerml.data.archive_survey import Survey, check_members_cover_split, load_or_survey
from flowerml.data.manifest import (
    ManifestEntry,
    content_version,
    count_splits,
    dataset_prefix,
    encode_json,
    manifest_key,
    parse_manifest,
    quarantine_key,
    read_current,
    read_manifest,
    read_quarantine_names,
    version_prefix,
    write_current,
    write_manifest,
)
from flowerml.data.raw_mirror import (
    SOURCES_RECORD,
    local_raw_files,
    mirror_sources,
    official_already_mirrored,
    raw_key,
    read_sources_record,
    seed_raw_cache,
)
from flowerml.data.source_files import (
    FetchOptions,
    check_source_file,
    describe_source,
    materialise_source,
    resolve_source,
)
from flowerml.data.splits import OfficialSplit, read_official_split
from flowerml.data.sync import file_state, version_root
from flowerml.data.sync_seed import SyncSeed
from flowerml.data.synthetic import is_synthetic
from flowerml.io.locations import OfficialLocation, SourceLocation
from flowerml.io.storage import ObjectNotFound, Store


@dataclass(frozen=True)
class IngestResult:
    """What an ingest published; `to_json()` is the CLI's --json object.

    `location` is the version's folder in full (path or s3:// URI); `replaced` the version
    CURRENT named before, when this ingest moved it (None when it was unset or unchanged);
    `synthetic` whether the archive was drawn by `flowerml synth`; `current` the version CURRENT
    names after it: this one, or one that adds labelled images on top of it (the version to
    train on).
    """

    dataset: str
    version: str
    counts: dict[str, int]
    uploaded: int
    skipped: int
    quarantined: int
    store: str
    location: str
    replaced: str | None
    synthetic: bool
    current: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def leaves_no_empty_folders(step: Callable[..., Any]) -> Callable[..., Any]:
    """When `step` (called with a `store` and a `dataset`) fails, the empty folders it left on
    a local store (under the dataset, and the store's own folder if it made it) are removed."""
    parameters = signature(step)

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except BaseException:
            bound = parameters.bind(*args, **kwargs).arguments
            # The step's own error is the one to report, whatever the tidying meets.
            with contextlib.suppress(ValueError, OSError):
                bound["store"].remove_empty_folders(dataset_prefix(bound["dataset"]))
            raise

    return run


# --------------------------------------------------------------------------------------------
# Step 1: fetch


@leaves_no_empty_folders
def fetch_sources(source: str | SourceLocation, store: Store, dataset: str, cache_dir: Path,
                  options: FetchOptions, *, workers: int | None = None,
                  progress: Progress | None = None) -> dict:
    """Mirror the three checked source files to `datasets/<name>/raw/`; returns the record."""
    location = resolve_source(source)  # before the store is touched
    official = isinstance(location, OfficialLocation)
    verify = options.verify or official
    store.check()
    store.check_writable()  # a read-only key is refused before any download
    check_no_own_classes(store, dataset)
    record = read_sources_record(store, dataset)
    if official and official_already_mirrored(store, dataset, record):
        return record  # type: ignore[return-value]
    local = {name: materialise_source(location, name, cache_dir, options)
             for name in flowers.SOURCE_FILES}
    md5s = {}
    for name, path in local.items():
        try:
            md5s[name] = check_source_file(path, name, verify)
        except SourceError:
            if path.is_relative_to(cache_dir):
                path.unlink(missing_ok=True)  # never reuse a bad download
            raise
    split = read_official_split(local[flowers.LABELS], local[flowers.SETID])
    local = seed_raw_cache(local, cache_dir, dataset)
    survey = load_or_survey(local[flowers.ARCHIVE], md5s[flowers.ARCHIVE], cache_dir, dataset,
                            workers, progress or NullProgress())
    check_members_cover_split(flowers.ARCHIVE, survey.present, split)
    return mirror_sources(store, dataset, record, local, md5s, describe_source(source), verify)


def own_classes_source(store: Store, dataset: str) -> str | None:
    """The `imagefolder:PATH` a dataset of one's own classes was published from (its CURRENT
    manifest's sources), or None: Flowers-102, nothing published, or nothing readable."""
    try:
        current = read_current(store, dataset)
        if current is None:
            return None
        key = manifest_key(dataset, current["version"])
        sources = read_manifest(store.location(key), store.get_bytes(key)).sources
    except (ObjectNotFound, DataError):
        return None  # nothing readable to protect: ingest repairs a damaged dataset
    if "imagefolder" not in sources:
        return None
    return str(sources["imagefolder"].get("path", "imagefolder:PATH"))


def check_no_own_classes(store: Store, dataset: str) -> None:
    """Refuse to fetch Flowers-102 into a dataset of one's own classes (`imagefolder:`): it
    has no official source, and publishing one would move CURRENT off its classes."""
    path = own_classes_source(store, dataset)
    if path is not None:
        raise SourceError(f"dataset '{dataset}' holds its own classes (from {path}) and has "
                          "no Flowers-102 source: publish it again with flowerml ingest "
                          f"--source {path} --dataset {dataset}")


# --------------------------------------------------------------------------------------------
# Step 2: publish


def build_entries(split: OfficialSplit, survey: Survey) -> list[ManifestEntry]:
    entries = []
    for split_name, ids in split.splits.items():
        for image_id in ids:
            if image_id in survey.problems:
                continue
            label = split.label_of(image_id)
            image = flowers.image_name(image_id)
            entries.append(ManifestEntry(
                split_name, label, image, f"{split_name}/{flowers.class_dir(label)}/{image}",
                survey.sizes[image_id], survey.sha256[image_id]))
    return sorted(entries, key=lambda e: e.key)


def build_quarantine(split: OfficialSplit, survey: Survey) -> list[dict]:
    where = split.split_of()
    return [{"image": flowers.image_name(i), "split": where[i], "label": split.label_of(i),
             "reason": survey.problems[i]} for i in sorted(survey.problems)]


def check_leakage(entries: list[ManifestEntry]) -> None:
    """Refuse identical bytes in two splits: a test image seen in training inflates accuracy."""
    by_hash: dict[str, list[ManifestEntry]] = defaultdict(list)
    for entry in entries:
        by_hash[entry.sha256].append(entry)
    leaks = [group for group in by_hash.values() if len({e.split for e in group}) > 1]
    if leaks:
        shown = "; ".join(" = ".join(f"{e.image} ({e.split})" for e in group)
                          for group in leaks[:5])
        raise LeakageError(f"identical images in more than one split, refusing to publish: "
                           f"{shown}" + (f"; and {len(leaks) - 5} more" if len(leaks) > 5 else ""))


def upload_missing(store: Store, prefix: str, entries: Sequence[ManifestEntry],
                   staged: Callable[[ManifestEntry], Path],
                   progress: Progress, seed: SyncSeed | None = None) -> tuple[int, int, int]:
    """Upload the entries not under `prefix` yet (by key and size) from their staged files,
    each checked against its sha256 first (read through its link in the local copy when
    `seed` makes one); (uploaded, bytes uploaded, already there)."""
    existing = {info.key: info.size for info in store.list(prefix + "/")}
    todo = [e for e in entries if existing.get(f"{prefix}/{e.key}") != e.size]
    progress.start("uploading images", len(todo))
    sent = 0

    def read_checked(entry: ManifestEntry) -> bytes:
        path = seed.link(entry, staged(entry)) if seed else staged(entry)
        state = file_state(path) if seed else None  # before the read: a write changes it
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise SourceError(f"{path}: staged image changed since it was checked; delete "
                              f"{path.parent} and re-run")
        if seed:
            seed.record(entry, path, state)
        return data

    def advance(size: int) -> None:
        nonlocal sent
        sent += size
        progress.advance()

    stream = ((f"{prefix}/{entry.key}", read_checked(entry)) for entry in todo)
    uploaded = store.upload_many(stream, progress=advance)
    return uploaded, sent, len(entries) - len(todo)


@leaves_no_empty_folders
def publish_split(store: Store, dataset: str, cache_dir: Path, *, workers: int | None = None,
                  progress: Progress | None = None) -> IngestResult:
    """Publish the official split from `datasets/<name>/raw/` as a content-addressed version."""
    progress = progress or NullProgress()
    store.check()
    store.check_writable()
    record = read_sources_record(store, dataset)
    if record is None:
        raise DatasetNotFound(f"{store.location(raw_key(dataset, SOURCES_RECORD))}: not found; "
                              "fetch the sources first (flowerml ingest)")
    files = local_raw_files(store, dataset, record, cache_dir)
    split = read_official_split(files[flowers.LABELS], files[flowers.SETID])
    survey = load_or_survey(files[flowers.ARCHIVE], record["files"][flowers.ARCHIVE]["md5"],
                            cache_dir, dataset, workers, progress)
    check_members_cover_split(flowers.ARCHIVE, survey.present, split)
    entries = build_entries(split, survey)
    check_leakage(entries)
    quarantine = build_quarantine(split, survey)
    return publish_version(
        store, dataset, flowers.class_names_for(split.num_classes), entries, quarantine,
        sources=record["files"], synthetic=is_synthetic(files[flowers.LABELS]),
        staged=lambda entry: survey.staged(flowers.image_id(entry.image)), progress=progress,
        cache_dir=cache_dir)


def publish_version(store: Store, dataset: str, class_names: Sequence[str],
                    entries: list[ManifestEntry], quarantine: list[dict], *, sources: dict,
                    synthetic: bool, staged: Callable[[ManifestEntry], Path],
                    progress: Progress, cache_dir: Path | None = None) -> IngestResult:
    """The one publish path of a dataset's version (the official split, an imagefolder):
    content-addressed version, the images not on the store yet (read from `staged`), then
    `quarantine.json`, `manifest.json` last of the version, then CURRENT. With `cache_dir`,
    the uploaded images are left in its local copy of the version (`SyncSeed`)."""
    quarantined_images = [q["image"] for q in quarantine]
    version = content_version(entries, quarantined_images, synthetic, class_names)
    prefix = version_prefix(dataset, version)
    # One writer per version at a time; on a local store, the temp files an ingest stopped
    # mid-upload left in the version (SIGKILL) are removed as this one starts.
    with store.writing_under(prefix):
        manifest = published_manifest(store, dataset, version)
        if manifest is None:
            seed = SyncSeed(version_root(cache_dir, dataset, version)) if cache_dir else None
            uploaded, _bytes, skipped = upload_missing(store, prefix, entries, staged, progress,
                                                       seed)
            store.put_bytes(quarantine_key(dataset, version), encode_json(quarantine))
            manifest = write_manifest(store, dataset, version, class_names, entries,
                                      quarantined_images=quarantined_images,
                                      sources=sources, synthetic=synthetic)
            if seed:
                seed.stamp(hashlib.sha256(manifest).hexdigest())
        else:
            uploaded, skipped = 0, len(entries)
    replaced = move_current(store, dataset, version, manifest)
    current = (read_current(store, dataset) or {}).get("version", version)
    return IngestResult(dataset, version, count_splits(entries), uploaded, skipped,
                        len(quarantine), store.uri, store.location(prefix), replaced, synthetic,
                        current)


def published_manifest(store: Store, dataset: str, version: str) -> bytes | None:
    """The version's manifest when it is already published and checks out; None when this
    ingest must write it (absent, or damaged or edited since: re-ingesting repairs it)."""
    key = manifest_key(dataset, version)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        return None
    try:
        parse_manifest(store.location(key), raw, dataset, version, hashlib.sha256(raw).hexdigest(),
                       read_quarantine=lambda: read_quarantine_names(store, dataset, version))
    except DataError:
        return None
    return raw


def move_current(store: Store, dataset: str, version: str, manifest: bytes) -> str | None:
    """Point CURRENT at `version`; returns the version it named before when this moved it.
    CURRENT stays where it is when it already builds on `version` (labelled images added on
    top by `flowerml ingest --add`): re-ingesting the same archive must not drop them."""
    try:
        before = read_current(store, dataset)
    except DataError:
        before = None  # a damaged CURRENT is one of the things an ingest repairs
    previous = before["version"] if before else None
    if previous is not None and previous != version and builds_on(store, dataset, previous,
                                                                  version):
        return None
    write_current(store, dataset, version, manifest)
    return previous if previous != version else None


def builds_on(store: Store, dataset: str, child: str, ancestor: str) -> bool:
    """Whether `ancestor` is on `child`'s chain of parents (its manifests name them)."""
    seen = set()
    version: str | None = child
    while version is not None and version not in seen:
        if version == ancestor:
            return True
        seen.add(version)
        key = manifest_key(dataset, version)
        try:
            version = read_manifest(store.location(key), store.get_bytes(key)).parent
        except (ObjectNotFound, DataError):
            return False
    return False


def ingest(source: str | SourceLocation, store: Store, dataset: str, cache_dir: Path,
           options: FetchOptions, *, workers: int | None = None,
           progress: Progress | None = None) -> IngestResult:
    """Fetch then publish: the whole `flowerml ingest`."""
    fetch_sources(source, store, dataset, cache_dir, options, workers=workers, progress=progress)
    return publish_split(store, dataset, cache_dir, workers=workers, progress=progress)
