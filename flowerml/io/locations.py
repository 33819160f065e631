"""Where data lives: the one parser for a source (`--source`) and a store (`--store`,
FLOWERML_STORE).

Both take the same schemes, so what names a folder or a bucket for one names it for the other:

- a local folder: a path (`./data`, `/srv/flowers`, `~/flowers`) or `file://PATH`
  (`file:///srv/flowers`; `file://localhost/srv/flowers` is the same folder);
- `s3://bucket[/prefix]`, the bucket named by S3's rules;
- sources only: an `http(s)://host[:port]/path` base URL, `official` (the Oxford site), and
  `imagefolder:PATH` (PATH a folder path, file://PATH or s3://bucket[/prefix] of class folders:
  a dataset of the user's own classes rather than the three Flowers-102 files).

Anything else (another scheme such as `ftp://`, an empty value, `s3://` without a bucket, an
invalid bucket name, a URL without a host or with a port outside 1-65535) is refused with one
line naming the accepted forms, before anything is read or written. A value that starts with
`word:` but not `word://` (a folder named `data:2024`) is a local path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flowerml.core.errors import UserError
from flowerml.io.urls import redact_url, url_problem

__all__ = [
    "SOURCE_FORMS",
    "STORE_FORMS",
    "ImageFolderLocation",
    "LocalLocation",
    "LocationError",
    "OfficialLocation",
    "S3Location",
    "SourceLocation",
    "StoreLocation",
    "UrlLocation",
    "bucket_name_problem",
    "parse_source",
    "parse_store",
]

STORE_FORMS = "a store is a folder path, file://PATH or s3://bucket[/prefix]"
SOURCE_FORMS = ("a source is 'official', a folder path, file://PATH, s3://bucket[/prefix], "
                "an http(s)://host/path URL or imagefolder:PATH")
IMAGEFOLDER = "imagefolder:"
BUCKET_RULE = ("S3 bucket names are 3-63 characters of a-z, 0-9, '.' and '-', begin and end "
               "with a letter or digit, and are not IP addresses")

# A URI scheme of two or more characters ("C:" would be a Windows drive, not a scheme).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class LocationError(UserError):
    """A source or store that is not one of the accepted forms.

    `detail` is the message without the name of what was given (the settings name it as an
    option, a variable or a .env entry, depending on where the value came from).
    """

    def __init__(self, name: str, problem: str, forms: str) -> None:
        self.detail = f"{problem}; {forms}"
        super().__init__(f"{name} {self.detail}")


@dataclass(frozen=True)
class LocalLocation:
    """A folder on this machine (or a filesystem mounted on it)."""

    path: Path


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing '/') on an S3-compatible endpoint."""

    bucket: str
    prefix: str = ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class UrlLocation:
    """An http(s) base URL; `url` may carry credentials, so messages use `shown`."""

    url: str

    @property
    def shown(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class OfficialLocation:
    """The Oxford VGG site the dataset is published on (`flowers.BASE_URL`)."""


StoreLocation = LocalLocation | S3Location


@dataclass(frozen=True)
class ImageFolderLocation:
    """`imagefolder:PATH`: a folder (local or an S3 prefix) of class folders, or of train/,
    valid/ and test/ each holding them; `shown` is the value as messages quote it."""

    root: StoreLocation
    shown: str

    @property
    def uri(self) -> str:
        """The folder as a store URI (`open_store` takes it)."""
        return self.root.uri if isinstance(self.root, S3Location) else str(self.root.path)


SourceLocation = LocalLocation | S3Location | UrlLocation | OfficialLocation | ImageFolderLocation


def parse_store(value: str, name: str = "store") -> StoreLocation:
    """The store `value` names; `LocationError` (naming it as `name`) for anything else."""
    location = _parse(value, name, STORE_FORMS, remote_sources=False)
    assert isinstance(location, LocalLocation | S3Location)
    return location


def parse_source(value: str, name: str = "source") -> SourceLocation:
    """The source `value` names; `LocationError` (naming it as `name`) for anything else."""
    return _parse(value, name, SOURCE_FORMS, remote_sources=True)


def _parse(value: str, name: str, forms: str, *, remote_sources: bool) -> SourceLocation:
    text = value.strip()
    if not text:
        raise LocationError(name, "must not be empty", forms)
    if remote_sources and text == "official":
        return OfficialLocation()
    if remote_sources and text.startswith(IMAGEFOLDER):
        folder = text.removeprefix(IMAGEFOLDER)
        if not folder.strip():
            raise LocationError(name, f"'{text}' has no folder after {IMAGEFOLDER}", forms)
        root = _parse(folder, name, forms, remote_sources=False)
        assert isinstance(root, LocalLocation | S3Location)
        return ImageFolderLocation(root, _shown(text))
    match = _SCHEME.match(text)
    if match is None:
        return LocalLocation(Path(text).expanduser())
    scheme = match.group(1).lower()
    rest = text[match.end():]
    shown = f"'{_shown(text)}'"
    if scheme == "file":
        return _parse_file(rest, shown, name, forms)
    if scheme == "s3":
        return _parse_s3(rest, shown, name, forms)
    if scheme in ("http", "https") and remote_sources:
        problem = url_problem(text)
        if problem:
            raise LocationError(name, f"{shown} {problem}", forms)
        return UrlLocation(text)
    raise LocationError(name, f"{shown} uses an unsupported scheme ({scheme}://)", forms)


def _shown(uri: str) -> str:
    """`uri` as a message may quote it: as typed, unless it carries credentials or a query
    (a presigned signature), which `redact_url` strips."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_url(uri)
    return redact_url(uri) if "@" in parts.netloc or parts.query else uri


def _parse_file(rest: str, shown: str, name: str, forms: str) -> LocalLocation:
    # file:///abs and file://localhost/abs are the standard spellings; what follows file://
    # otherwise is taken as a path (file://./store has always meant ./store here).
    path = rest[len("localhost"):] if rest.startswith("localhost/") else rest
    path = unquote(path)
    if not path.strip():
        raise LocationError(name, f"{shown} has no path after file://", forms)
    return LocalLocation(Path(path).expanduser())


def _parse_s3(rest: str, shown: str, name: str, forms: str) -> S3Location:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise LocationError(name, f"{shown} has no bucket name", forms)
    problem = bucket_name_problem(bucket)
    if problem:
        raise LocationError(name, f"{shown} has an invalid bucket name: {problem}", forms)
    prefix = prefix.strip("/")
    if "\\" in prefix or (prefix and any(p in ("", ".", "..") for p in prefix.split("/"))):
        raise LocationError(name, f"{shown} has an invalid prefix: empty, '.' and '..' "
                                  "segments and backslashes are not allowed", forms)
    return S3Location(bucket, prefix)


def bucket_name_problem(bucket: str) -> str | None:
    """Why `bucket` is not a valid S3 bucket name, or None.

    Checked here, before boto3 (whose ParamValidationError would otherwise escape as a
    traceback), with the rules AWS and the self-hosted stores (MinIO, Ceph) enforce. Legacy
    us-east-1 names with capitals or underscores are refused too: path-style access is the
    only way to reach them, and no current service creates them.
    """
    if not _BUCKET.match(bucket) or ".." in bucket:
        return BUCKET_RULE
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return BUCKET_RULE
