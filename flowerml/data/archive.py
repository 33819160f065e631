"""Reading the Flowers-102 archive safely, as a stream.

The archive is read member by member (never whole in memory, never extracted to disk). Only
regular files named `jpg/image_NNNNN.jpg` are accepted: any other member (a path that escapes,
a link, a device file, an unexpected name, an oversized file) fails the whole archive, so a
tampered archive can never put anything on disk or on the store.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flowerml.core.errors import ArchiveError, SourceError
from flowerml.data.flowers import MEMBER_PATTERN

MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024 * 1024

_MEMBER = re.compile(MEMBER_PATTERN)
_ALLOWED_DIRS = {"jpg", "."}

GZIP_MAGIC = b"\x1f\x8b"
MAT5_MAGIC = b"MATLAB 5.0 MAT-file"


@dataclass(frozen=True)
class ArchiveImage:
    """One image of the archive: its 1-based id and its exact bytes."""

    image_id: int
    member: str
    data: bytes


def looks_like_html(head: bytes) -> bool:
    """True for the start of an HTML or XML page (an error or login page served instead)."""
    # Neither gzip nor .mat data can start with '<'; markup always does.
    return head.lstrip().startswith(b"<")


def sniff(path: Path, magic: bytes, kind: str, error: type[SourceError]) -> None:
    """Refuse a file that does not start with `magic`, naming an HTML page as such."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if looks_like_html(head):
        raise error(f"{path.name}: is an HTML page, not a {kind} "
                    "(the server sent an error or login page)")
    if not head.startswith(magic):
        raise error(f"{path.name}: is not a {kind}")


def sniff_archive(path: Path) -> None:
    """Refuse a file that is not gzip data before any parsing starts."""
    sniff(path, GZIP_MAGIC, "gzip archive", ArchiveError)


def sniff_mat(path: Path) -> None:
    """Refuse a file that is not a MATLAB 5 .mat file."""
    sniff(path, MAT5_MAGIC, "MATLAB 5 .mat file", SourceError)


def member_image_id(member: tarfile.TarInfo) -> int | None:
    """The image id of an acceptable member, None for an allowed directory; raise otherwise."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise ArchiveError(f"archive member {name!r}: unsafe path (absolute or '..')")
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive member {name!r}: links are refused")
    if member.isdir():
        if name.rstrip("/").removeprefix("./") in _ALLOWED_DIRS:
            return None
        raise ArchiveError(f"archive member {name!r}: unexpected directory")
    if not member.isreg():
        raise ArchiveError(f"archive member {name!r}: special files are refused")
    match = _MEMBER.fullmatch(name.removeprefix("./"))
    if not match:
        raise ArchiveError(f"archive member {name!r}: not of the form jpg/image_NNNNN.jpg")
    return int(match.group(1))


def iter_archive_images(path: Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
                        max_total_bytes: int = MAX_TOTAL_BYTES) -> Iterator[ArchiveImage]:
    """Yield every image of a .tgz in archive order, validating each member before reading it."""
    sniff_archive(path)
    total = 0
    seen: set[int] = set()
    try:
        # gzip.open (not tarfile's own "r|gz") so that draining to EOF checks the CRC and length
        # trailer: a file cut after the last member would otherwise pass as complete.
        with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                image_id = member_image_id(member)
                if image_id is None:
                    continue
                if member.size > max_member_bytes:
                    raise ArchiveError(f"archive member {member.name!r}: {member.size} bytes "
                                       f"exceeds the {max_member_bytes}-byte cap")
                total += member.size
                if total > max_total_bytes:
                    raise ArchiveError(f"{path.name}: more than {max_total_bytes} bytes of images")
                if image_id in seen:
                    raise ArchiveError(f"archive member {member.name!r}: appears twice")
                seen.add(image_id)
                handle = archive.extractfile(member)
                data = handle.read() if handle else b""
                if len(data) != member.size:
                    raise ArchiveError(f"{path.name}: truncated inside {member.name!r}")
                yield ArchiveImage(image_id, member.name.removeprefix("./"), data)
            while stream.read(1 << 20):
                pass
    except (tarfile.ReadError, EOFError, zlib.error, OSError) as error:
        raise ArchiveError(f"{path.name}: truncated or corrupt archive "
                           f"({type(error).__name__}: {error})") from None
