"""Ingest: the three source files onto the store, then the official split as ImageFolder trees.

Two steps, each safe to repeat and to interrupt:

1. `fetch_sources` materialises the files from a source (the official site, a mirror URL, a
   local folder or an s3:// prefix), checks what they are (gzip, .mat, not an HTML page), their
   MD5s when verifying, the .mat consistency and the archive's members, and only then mirrors them
   to `datasets/<name>/raw/` with a `sources.json` record written last.
2. `publish_split` surveys the archive (sha256 and a decode check of every image), refuses
   train/valid/test leakage, derives the content-addressed version, uploads the images that are
   not there yet, byte-identical to the archive, then `quarantine.json`, `manifest.json` last of
   the version, then `CURRENT` (both written by `flowerml.manifest`, which owns their shape).
   An archive `flowerml synth` drew (its imagelabels.mat carries the marker) is published as
   synthetic; the result names the version in full and the version CURRENT named before.

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
import io
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from inspect import signature
from pathlib import Path
from typing import Any

from PIL import Image

from flowerml import flowers
from flowerml.archive import ArchiveImage, iter_archive_images, sniff_archive, sniff_mat
from flowerml.download import download_file, md5_of, redact_url
from flowerml.errors import ArchiveError, DataError, DatasetNotFound, LeakageError, SourceError
from flowerml.files import write_atomically
from flowerml.locations import (
    LocalLocation,
    OfficialLocation,
    S3Location,
    SourceLocation,
    UrlLocation,
    parse_source,
)
from flowerml.manifest import (
    ManifestEntry,
    content_version,
    count_splits,
    dataset_prefix,
    encode_json,
    manifest_key,
    parse_manifest,
    quarantine_key,
    read_current,
    read_quarantine_names,
    version_prefix,
    write_current,
    write_manifest,
)
from flowerml.progress import NullProgress, Progress
from flowerml.splits import OfficialSplit, read_official_split
from flowerml.storage import ObjectNotFound, S3Options, Store, StoreAccessError, run_bounded
from flowerml.storage_s3 import S3Store
from flowerml.synthetic import is_synthetic

SOURCES_RECORD = "sources.json"


@dataclass(frozen=True)
class FetchOptions:
    """How to reach and check a source."""

    verify: bool = False
    retries: int = 5
    timeout: float = 60.0
    s3: S3Options | None = None


@dataclass(frozen=True)
class IngestResult:
    """What an ingest published; `to_json()` is the CLI's --json object.

    `location` is the version's folder in full (path or s3:// URI); `replaced` the version
    CURRENT named before, when this ingest moved it (None when it was unset or unchanged);
    `synthetic` whether the archive was drawn by `flowerml synth`.
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

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def raw_key(dataset: str, name: str) -> str:
    return f"{dataset_prefix(dataset)}/raw/{name}"


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


def resolve_source(source: str | SourceLocation) -> SourceLocation:
    """The source a `--source` value names (`flowerml.locations.parse_source`: 'official', a
    folder path, file://PATH, s3://bucket[/prefix] or an http(s) URL), refused before anything
    is read or written when it cannot work: another scheme, no bucket or host, or a local path
    that is not an existing folder."""
    location = parse_source(source) if isinstance(source, str) else source
    if isinstance(location, LocalLocation):
        check_source_folder(location.path)
    return location


def check_source_folder(folder: Path) -> None:
    """A local source is a folder holding the three files; name what it is otherwise."""
    if folder.exists() and not folder.is_dir():
        *others, last = flowers.SOURCE_FILES
        raise SourceError(f"source {folder} is a file, not a folder: a local source is the "
                          f"folder holding {', '.join(others)} and {last}")
    if not folder.is_dir():
        raise SourceError(f"source folder {folder} does not exist")


def describe_source(source: str | SourceLocation) -> str:
    """The source as it may be logged and recorded: credentials stripped."""
    if isinstance(source, OfficialLocation):
        return "official"
    if isinstance(source, LocalLocation):
        return str(source.path)
    if isinstance(source, S3Location):
        return source.uri
    if isinstance(source, UrlLocation):
        return source.shown
    return redact_url(source) if "://" in source else source


def materialise_source(location: SourceLocation, name: str, cache_dir: Path,
                       options: FetchOptions) -> Path:
    """A local path holding source file `name`, downloading it into the cache when remote."""
    key = hashlib.sha256(describe_source(location).encode()).hexdigest()[:16]
    downloads = cache_dir / "downloads" / key
    if isinstance(location, OfficialLocation | UrlLocation):
        base = flowers.BASE_URL if isinstance(location, OfficialLocation) else location.url
        return download_file(base.rstrip("/") + "/" + name, downloads / name,
                             retries=options.retries, timeout=options.timeout)
    if isinstance(location, S3Location):
        remote = S3Store(location.bucket, location.prefix, options.s3, concurrency=4)
        try:
            return remote.get_file(name, downloads / name)
        except ObjectNotFound:
            try:
                remote.check()  # a missing bucket answers a bare 404 too: say which it is
            except StoreAccessError as error:
                raise SourceError(f"source {location.uri}: {error}") from None
            raise SourceError(f"{name}: not found under {location.uri}") from None
    path = location.path / name
    if not path.is_file():
        raise SourceError(f"{name}: not found in source folder {location.path}")
    return path


def check_source_file(path: Path, name: str, verify: bool) -> str:
    """Check a file is what it claims to be; returns its MD5."""
    if name == flowers.ARCHIVE:
        sniff_archive(path)
    else:
        sniff_mat(path)
    md5 = md5_of(path)
    if verify and md5 != flowers.SOURCE_MD5[name]:
        raise SourceError(f"{name}: MD5 mismatch: expected {flowers.SOURCE_MD5[name]}, got {md5}")
    return md5


def check_members_cover_split(archive_name: str, present: set[int], split: OfficialSplit) -> None:
    missing = sorted(set(split.split_of()) - present)
    if missing:
        names = ", ".join(flowers.image_name(i) for i in missing[:5])
        raise ArchiveError(f"{archive_name}: {len(missing)} image(s) named in setid.mat are "
                           f"missing from the archive ({names})")


def read_sources_record(store: Store, dataset: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(raw_key(dataset, SOURCES_RECORD)))
    except ObjectNotFound:
        return None


def raw_is_current(store: Store, dataset: str, record: dict | None, name: str, md5: str) -> bool:
    """The store already mirrors this file (same MD5 in the record, same size on the store)."""
    if not record or record["files"].get(name, {}).get("md5") != md5:
        return False
    info = store.head(raw_key(dataset, name))
    return info is not None and info.size == record["files"][name]["size"]


def official_already_mirrored(store: Store, dataset: str, record: dict | None) -> bool:
    return all(raw_is_current(store, dataset, record, name, flowers.SOURCE_MD5[name])
               for name in flowers.SOURCE_FILES)


def raw_cache_dir(cache_dir: Path, dataset: str) -> Path:
    return cache_dir / dataset / "raw"


def seed_raw_cache(local: dict[str, Path], cache_dir: Path, dataset: str) -> dict[str, Path]:
    """Put the checked files where publish looks first, so it need not download them back."""
    raw_dir = raw_cache_dir(cache_dir, dataset)
    raw_dir.mkdir(parents=True, exist_ok=True)
    seeded = {}
    for name, path in local.items():
        target = raw_dir / name
        if path.resolve() != target.resolve():
            write_atomically(target, lambda temp, path=path: _link_or_copy(path, temp))
        seeded[name] = target
    return seeded


def _link_or_copy(source: Path, temp: Path) -> None:
    temp.unlink()
    try:
        os.link(source, temp)  # same filesystem: no copy at all
    except OSError:
        shutil.copyfile(source, temp)


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
    for name, path in local.items():
        if not raw_is_current(store, dataset, record, name, md5s[name]):
            store.put_file(raw_key(dataset, name), path)
    new_record = {
        "source": describe_source(source),
        "verified": verify,
        "files": {name: {"md5": md5s[name], "size": local[name].stat().st_size}
                  for name in flowers.SOURCE_FILES},
    }
    if new_record != record:
        store.put_bytes(raw_key(dataset, SOURCES_RECORD), encode_json(new_record))
    return new_record


# --------------------------------------------------------------------------------------------
# Step 2: publish


def local_raw_files(store: Store, dataset: str, record: dict, cache_dir: Path) -> dict[str, Path]:
    """The raw files in the local cache, downloaded from the store unless already there."""
    raw_dir = raw_cache_dir(cache_dir, dataset)
    files = {}
    for name in flowers.SOURCE_FILES:
        path = raw_dir / name
        expected = record["files"][name]
        if not (path.is_file() and path.stat().st_size == expected["size"]
                and md5_of(path) == expected["md5"]):
            store.get_file(raw_key(dataset, name), path)
            if md5_of(path) != expected["md5"]:
                path.unlink()
                raise SourceError(f"{store.location(raw_key(dataset, name))}: MD5 differs "
                                  f"from {SOURCES_RECORD}")
        files[name] = path
    return files


def check_jpeg(data: bytes) -> str | None:
    """None when `data` is a JPEG that decodes; otherwise why not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return f"not a JPEG ({image.format})"
            width, height = image.size
            if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
                return f"decompression bomb ({width}x{height} pixels)"
            # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation and
            # corrupt data fail the same way, at a fraction of the cost.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"does not decode: {error}"
    return None


@dataclass
class Survey:
    """What one pass over the archive learned: each image's size, sha256 and decode verdict.

    The images themselves are staged beside it, so publishing needs no second pass over the
    compressed archive.
    """

    folder: Path
    sizes: dict[int, int]
    sha256: dict[int, str]
    problems: dict[int, str]
    present: set[int]

    def staged(self, image_id: int) -> Path:
        return self.folder / flowers.image_name(image_id)

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "sha256": self.sha256, "problems": self.problems,
                "present": sorted(self.present)}

    @classmethod
    def from_json(cls, folder: Path, value: dict) -> Survey:
        def by_id(mapping: dict) -> dict:
            return {int(k): v for k, v in mapping.items()}

        return cls(folder, by_id(value["sizes"]), by_id(value["sha256"]),
                   by_id(value["problems"]), set(value["present"]))


def survey_folder(cache_dir: Path, dataset: str, archive_md5: str) -> Path:
    return cache_dir / dataset / "survey" / archive_md5


def load_or_survey(archive: Path, archive_md5: str, cache_dir: Path, dataset: str,
                   workers: int | None, progress: Progress) -> Survey:
    """The survey of this exact archive: from the cache, or by one pass over it."""
    folder = survey_folder(cache_dir, dataset, archive_md5)
    record = folder / "survey.json"
    if record.is_file():
        return Survey.from_json(folder, json.loads(record.read_text()))
    survey = survey_archive(archive, folder, workers or default_workers(), progress)
    # Written last: it vouches for every staged image.
    write_atomically(record, json.dumps(survey.to_json()).encode())
    return survey


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def survey_archive(archive: Path, folder: Path, workers: int, progress: Progress) -> Survey:
    """Stage, sha256 and decode-check every image on `workers` threads (Pillow drops the GIL)."""
    folder.mkdir(parents=True, exist_ok=True)
    survey = Survey(folder, {}, {}, {}, set())

    def inspect(image: ArchiveImage) -> int:
        survey.staged(image.image_id).write_bytes(image.data)
        survey.sizes[image.image_id] = len(image.data)
        survey.sha256[image.image_id] = hashlib.sha256(image.data).hexdigest()
        problem = check_jpeg(image.data)
        if problem:
            survey.problems[image.image_id] = problem
        return len(image.data)

    def images() -> Iterator[ArchiveImage]:
        for image in iter_archive_images(archive):
            survey.present.add(image.image_id)
            yield image

    progress.start("checking images", None)
    run_bounded(inspect, images(), workers, lambda _size: progress.advance())
    return survey


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


def upload_images(store: Store, prefix: str, survey: Survey, entries: list[ManifestEntry],
                  progress: Progress) -> tuple[int, int]:
    """Upload what is not on the store yet, from the staged images; (uploaded, skipped)."""
    existing = {info.key: info.size for info in store.list(prefix + "/")}
    todo = [e for e in entries if existing.get(f"{prefix}/{e.key}") != e.size]
    progress.start("uploading images", len(todo))

    def staged(entry: ManifestEntry) -> bytes:
        data = survey.staged(flowers.image_id(entry.image)).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise SourceError(f"{survey.folder / entry.image}: staged image changed since the "
                              f"survey; delete {survey.folder} and re-run")
        return data

    stream = ((f"{prefix}/{entry.key}", staged(entry)) for entry in todo)
    uploaded = store.upload_many(stream, progress=lambda _size: progress.advance())
    return uploaded, len(entries) - len(todo)


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
    quarantined_images = [q["image"] for q in quarantine]
    synthetic = is_synthetic(files[flowers.LABELS])
    version = content_version(entries, quarantined_images, synthetic)
    prefix = version_prefix(dataset, version)
    # One writer per version at a time; on a local store, the temp files an ingest stopped
    # mid-upload left in the version (SIGKILL) are removed as this one starts.
    with store.writing_under(prefix):
        manifest = published_manifest(store, dataset, version)
        if manifest is None:
            uploaded, skipped = upload_images(store, prefix, survey, entries, progress)
            store.put_bytes(quarantine_key(dataset, version), encode_json(quarantine))
            manifest = write_manifest(store, dataset, version,
                                      flowers.class_names_for(split.num_classes), entries,
                                      quarantined_images=quarantined_images,
                                      sources=record["files"], synthetic=synthetic)
        else:
            uploaded, skipped = 0, len(entries)
    replaced = move_current(store, dataset, version, manifest)
    return IngestResult(dataset, version, count_splits(entries), uploaded, skipped,
                        len(quarantine), store.uri, store.location(prefix), replaced, synthetic)


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
    """Point CURRENT at `version`; returns the version it named before when this moved it."""
    try:
        before = read_current(store, dataset)
    except DataError:
        before = None  # a damaged CURRENT is one of the things an ingest repairs
    write_current(store, dataset, version, manifest)
    previous = before["version"] if before else None
    return previous if previous != version else None


def ingest(source: str | SourceLocation, store: Store, dataset: str, cache_dir: Path,
           options: FetchOptions, *, workers: int | None = None,
           progress: Progress | None = None) -> IngestResult:
    """Fetch then publish: the whole `flowerml ingest`."""
    fetch_sources(source, store, dataset, cache_dir, options, workers=workers, progress=progress)
    return publish_split(store, dataset, cache_dir, workers=workers, progress=progress)
