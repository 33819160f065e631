"""Sync: a published split on local disk, every file's sha256 checked against the manifest.

`sync_split` makes `<cache>/<dataset>/<version>/<split>/<NNN>/` hold exactly the manifest's
JPEGs, downloading in parallel only what is missing or different. A per-split stamp remembers
which files were verified (by size, mtime and ctime), so a second sync of a complete split
stats the files instead of re-hashing them. `require_synced` is how later stages (the decode
cache, the folder dataset) refuse a split that was not synced; `parallel_map` is the thread pool
both the hashing here and the decode cache run on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flowerml.core.errors import DataError
from flowerml.core.files import file_lock, sha256_file, write_atomically
from flowerml.core.progress import NullProgress, Progress
from flowerml.data.manifest import ManifestEntry, PublishedDataset, check_split
from flowerml.io.storage import ObjectNotFound, Store

MAX_LISTED = 5  # files named in one error message

FileState = list[int]  # [size, mtime_ns, ctime_ns]


def local_root(cache_dir: Path, published: PublishedDataset) -> Path:
    return version_root(cache_dir, published.dataset, published.version)


def version_root(cache_dir: Path, dataset: str, version: str) -> Path:
    return Path(cache_dir) / dataset / version


def file_state(path: Path) -> FileState | None:
    """(size, mtime, ctime) in ns: any write to the file, even one that restores its mtime,
    changes the ctime, so a stamped file whose state still matches has not been touched."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def require_synced(files: Sequence[Path]) -> None:
    """A DataError naming the first few of `files` that are not on local disk."""
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{', '.join(missing[:MAX_LISTED])}: not in the local cache "
                        "(sync the split first)")


def parallel_map(work: Callable[[Any], Any], items: Sequence[Any],
                 workers: int | None = None) -> Iterator[Any]:
    """`work` over `items` on threads (hashlib, file I/O and Pillow release the GIL); the
    results in order, in the caller's thread, so progress reporting needs no locking."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    if workers == 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowerml-data") as pool:
        yield from pool.map(work, items)


# --------------------------------------------------------------------------------------------
# The stamp: which files were verified, in which state


def stamp_path(root: Path, split: str) -> Path:
    return root / f".verified-{split}.json"


def read_stamp(root: Path, split: str, manifest_sha256: str) -> dict[str, FileState]:
    """The verified files' states recorded for this manifest; {} when absent or for another."""
    try:
        stamp = json.loads(stamp_path(root, split).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("manifest_sha256") != manifest_sha256:
        return {}
    files = stamp.get("files")
    return files if isinstance(files, dict) else {}


def write_stamp(root: Path, split: str, manifest_sha256: str,
                files: dict[str, FileState]) -> None:
    stamp = {"split": split, "manifest_sha256": manifest_sha256, "files": files}
    write_atomically(stamp_path(root, split), json.dumps(stamp, sort_keys=True).encode())


# --------------------------------------------------------------------------------------------
# The sync


def sync_split(store: Store, published: PublishedDataset, splits: Sequence[str] | str,
               cache_dir: Path, *, progress: Progress | None = None) -> Path:
    """Make `<cache>/<dataset>/<version>/<split>/` hold exactly the manifest's files; the root.

    Files already there are trusted when the split's stamp records their current state,
    hashed otherwise; what is missing or differs is downloaded in parallel and hashed. A file
    whose sha256 does not match the manifest is deleted and named in the DataError.
    """
    progress = progress or NullProgress()
    root = local_root(cache_dir, published)
    for split in (splits,) if isinstance(splits, str) else splits:
        check_split(split)
        with file_lock(root / f".{split}.lock"):
            sync_one_split(store, published, split, root, progress)
    return root


def sync_one_split(store: Store, published: PublishedDataset, split: str, root: Path,
                   progress: Progress) -> None:
    stamp = read_stamp(root, split, published.manifest_sha256)
    verified, unchecked, todo = sort_by_stamp(root, published.split_files(split), stamp)
    if unchecked:
        progress.start(f"verifying {split}", len(unchecked))
        good, bad = verify_files(root, unchecked, progress)
        verified.update(good)
        todo.extend(bad)  # replaced by the download below: get_file swaps files atomically
    download_entries(store, published, split, root, todo, progress)
    good, bad = verify_files(root, todo, NullProgress()) if todo else ({}, [])
    verified.update(good)
    for entry in bad:
        (root / entry.key).unlink(missing_ok=True)  # never leave a bad file to be trusted
    if verified != stamp:
        write_stamp(root, split, published.manifest_sha256, verified)
    if bad:
        raise sha256_mismatch(published, bad)


def sort_by_stamp(root: Path, entries: list[ManifestEntry], stamp: dict[str, FileState]
                  ) -> tuple[dict[str, FileState], list[ManifestEntry], list[ManifestEntry]]:
    """({key: state} trusted by the stamp, [entries to hash], [entries to download])."""
    verified: dict[str, FileState] = {}
    unchecked, todo = [], []
    for entry in entries:
        state = file_state(root / entry.key)
        if state is None or state[0] != entry.size:
            todo.append(entry)
        elif stamp.get(entry.key) == state:
            verified[entry.key] = state
        else:
            unchecked.append(entry)
    return verified, unchecked, todo


def verify_files(root: Path, entries: list[ManifestEntry],
                 progress: Progress) -> tuple[dict[str, FileState], list[ManifestEntry]]:
    """({key: state} of the files whose sha256 matches, [entries that do not])."""

    def check(entry: ManifestEntry) -> tuple[ManifestEntry, FileState | None]:
        path = root / entry.key
        state = file_state(path)  # before hashing: a write during the hash changes the state
        try:
            ok = state is not None and sha256_file(path) == entry.sha256
        except FileNotFoundError:
            ok = False
        return entry, state if ok else None

    good, bad = {}, []
    for entry, state in parallel_map(check, entries):
        progress.advance()
        if state is None:
            bad.append(entry)
        else:
            good[entry.key] = state
    return good, bad


def download_entries(store: Store, published: PublishedDataset, split: str, root: Path,
                     entries: list[ManifestEntry], progress: Progress) -> None:
    if not entries:
        return
    progress.start(f"downloading {split}", len(entries))
    items = [(published.object_key(e), root / e.key) for e in entries]
    try:
        store.download_many(items, progress=lambda _size: progress.advance())
    except ObjectNotFound as error:
        raise DataError(f"{error}: the manifest of {published.dataset}@{published.version} "
                        "lists it, so the published version is incomplete (re-run flowerml "
                        "ingest)") from None


def sha256_mismatch(published: PublishedDataset, bad: list[ManifestEntry]) -> DataError:
    keys = ", ".join(published.object_key(e) for e in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(f"{keys}{more}: sha256 mismatch: the store does not match the manifest "
                     "(the downloaded file was removed from the local cache)")
