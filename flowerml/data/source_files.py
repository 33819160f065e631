"""The three Flowers-102 source files: where a `--source` points, and each file brought to a
local path and checked for what it claims to be.

A source is the official site, a mirror URL, a local folder or an s3:// prefix
(`flowerml.io.locations.parse_source`); `resolve_source` refuses one that cannot work before
anything is read or written. `materialise_source` gives a local path for one file (downloaded
into the cache when remote, by `flowerml.io.download` or the S3 store), and `check_source_file`
sniffs it (gzip, .mat, not an HTML page) and checks its MD5 when verifying.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from flowerml.core.errors import SourceError
from flowerml.core.files import md5_file
from flowerml.data import flowers
from flowerml.data.archive import sniff_archive, sniff_mat
from flowerml.io.download import download_file
from flowerml.io.locations import (
    ImageFolderLocation,
    LocalLocation,
    OfficialLocation,
    S3Location,
    SourceLocation,
    UrlLocation,
    parse_source,
)
from flowerml.io.storage import ObjectNotFound, S3Options, StoreAccessError
from flowerml.io.storage_s3 import S3Store
from flowerml.io.urls import redact_url


@dataclass(frozen=True)
class FetchOptions:
    """How to reach and check a source."""

    verify: bool = False
    retries: int = 5
    timeout: float = 60.0
    s3: S3Options | None = None


def resolve_source(source: str | SourceLocation) -> SourceLocation:
    """The source a `--source` value names (`flowerml.io.locations.parse_source`: 'official', a
    folder path, file://PATH, s3://bucket[/prefix] or an http(s) URL), refused before anything
    is read or written when it cannot work: another scheme, no bucket or host, or a local path
    that is not an existing folder."""
    location = parse_source(source) if isinstance(source, str) else source
    if isinstance(location, ImageFolderLocation):
        # Class folders are published by flowerml.data.imagefolder; nothing here to fetch.
        raise SourceError(f"source {location.shown} is a folder of class folders, not the "
                          "three Flowers-102 files: publish it with flowerml ingest --source "
                          f"{location.shown} --dataset NAME")
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
    if isinstance(source, UrlLocation | ImageFolderLocation):
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
    md5 = md5_file(path)
    if verify and md5 != flowers.SOURCE_MD5[name]:
        raise SourceError(f"{name}: MD5 mismatch: expected {flowers.SOURCE_MD5[name]}, got {md5}")
    return md5
