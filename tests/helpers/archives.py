"""Damaged sources, the bad inputs the tests feed to ingest: tar members of every kind, and an
archive or .mat file rewritten with parts replaced, dropped or added."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io

from flowerml.data import flowers


def write_tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def regular(name: str, data: bytes = b"\xff\xd8jpeg") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def archive_members(folder: Path) -> dict[str, bytes]:
    with tarfile.open(folder / flowers.ARCHIVE) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def rewrite_archive(folder: Path, replace: dict[int, bytes] | None = None,
                    drop: set[int] | None = None,
                    extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None) -> None:
    """Rewrite the folder's archive with images replaced, dropped, or extra members appended."""
    replace, drop = replace or {}, drop or set()
    members = []
    for name, data in archive_members(folder).items():
        image_id = int(name[10:15])
        if image_id not in drop:
            members.append(regular(name, replace.get(image_id, data)))
    write_tgz(folder / flowers.ARCHIVE, members + (extra or []))


def rewrite_mat(path: Path, **changes: np.ndarray | None) -> None:
    """Rewrite a .mat file with keys replaced (an array) or removed (None)."""
    content = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    scipy.io.savemat(path, content)
