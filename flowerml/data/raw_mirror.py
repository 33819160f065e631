"""The raw mirror of a dataset's source files: `datasets/<name>/raw/` on the store, with
`sources.json` recording each file's MD5 and size, and its copy in the local cache.

Ingest's fetch step writes the mirror (each file only when the store lacks it, `sources.json`
last, so it vouches for files already there); its publish step reads the files back from the
local cache (`cache/<name>/raw/`), downloading from the store only what is missing or differs
from the record.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from flowerml.core.documents import DocumentError, StoredDocument, plain, read_document
from flowerml.core.errors import SourceError
from flowerml.core.files import md5_file, write_atomically
from flowerml.data import flowers
from flowerml.data.manifest import dataset_prefix, encode_json
from flowerml.io.storage import ObjectNotFound, Store

SOURCES_RECORD = "sources.json"


class DamagedSourcesRecord(DocumentError, SourceError):
    """A `sources.json` that does not read as `SourcesRecord`."""


class MirroredFile(StoredDocument):
    """One source file of the mirror: its MD5 (as published) and size in bytes."""

    md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    size: int


class SourcesRecord(StoredDocument):
    """`datasets/<name>/raw/sources.json`, written after the files it vouches for: where they
    came from, whether their MD5s were checked against the published ones, and each file."""

    source: str
    verified: bool
    files: dict[str, MirroredFile]


def raw_key(dataset: str, name: str) -> str:
    return f"{dataset_prefix(dataset)}/raw/{name}"


def read_sources_record(store: Store, dataset: str) -> dict[str, Any] | None:
    """sources.json, validated (DamagedSourcesRecord: one line naming the file and field),
    as its JSON object; None when the dataset has no mirror yet."""
    key = raw_key(dataset, SOURCES_RECORD)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        return None
    return plain(read_document(SourcesRecord, raw, store.location(key), DamagedSourcesRecord))


def raw_is_current(store: Store, dataset: str, record: dict | None, name: str, md5: str) -> bool:
    """The store already mirrors this file (same MD5 in the record, same size on the store)."""
    if not record or record["files"].get(name, {}).get("md5") != md5:
        return False
    info = store.head(raw_key(dataset, name))
    return info is not None and info.size == record["files"][name]["size"]


def official_already_mirrored(store: Store, dataset: str, record: dict | None) -> bool:
    return all(raw_is_current(store, dataset, record, name, flowers.SOURCE_MD5[name])
               for name in flowers.SOURCE_FILES)


def mirror_sources(store: Store, dataset: str, record: dict | None, local: dict[str, Path],
                   md5s: dict[str, str], source: str, verified: bool) -> dict:
    """Upload each checked file the store does not mirror yet, then `sources.json` when it
    changed (last: it vouches for the files); returns the record."""
    for name, path in local.items():
        if not raw_is_current(store, dataset, record, name, md5s[name]):
            store.put_file(raw_key(dataset, name), path)
    new_record = plain(SourcesRecord(
        source=source, verified=verified,
        files={name: MirroredFile(md5=md5s[name], size=local[name].stat().st_size)
               for name in flowers.SOURCE_FILES}))
    if new_record != record:
        store.put_bytes(raw_key(dataset, SOURCES_RECORD), encode_json(new_record))
    return new_record


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


def local_raw_files(store: Store, dataset: str, record: dict, cache_dir: Path) -> dict[str, Path]:
    """The raw files in the local cache, downloaded from the store unless already there."""
    raw_dir = raw_cache_dir(cache_dir, dataset)
    files = {}
    for name in flowers.SOURCE_FILES:
        path = raw_dir / name
        expected = record["files"][name]
        if not (path.is_file() and path.stat().st_size == expected["size"]
                and md5_file(path) == expected["md5"]):
            store.get_file(raw_key(dataset, name), path)
            if md5_file(path) != expected["md5"]:
                path.unlink()
                raise SourceError(f"{store.location(raw_key(dataset, name))}: MD5 differs "
                                  f"from {SOURCES_RECORD}")
        files[name] = path
    return files
