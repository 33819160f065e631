"""What a publish leaves in the local copy `sync_split` keeps: every image it uploads, hard-linked
from where it was staged and hashed as it was read, stamped for the new version's manifest.

The host that ingests is often the one that trains next (the retrain flow, `make demo`): its
first sync then stats the files instead of downloading and hashing them again. A link costs no
copy; where one cannot be made (another filesystem, a store without hard links) the image is
simply not seeded and the sync fetches it as before. A seeded file later written to changes its
ctime, so the stamp no longer vouches for it and the sync hashes it again.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from flowerml.core.files import file_lock
from flowerml.data.manifest import ManifestEntry
from flowerml.data.sync import FileState, read_stamp, write_stamp


class SyncSeed:
    """The images of one version being published, linked under `root` (`local_root` of the
    version) as they are read for upload."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.verified: dict[str, dict[str, FileState]] = defaultdict(dict)

    def link(self, entry: ManifestEntry, staged: Path) -> Path:
        """Where to read the entry from: its link in the local copy, or `staged` when no link
        could be made (a file already there is left to the sync to check)."""
        target = self.root / entry.key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(staged, target)
        except OSError:
            return staged
        return target

    def record(self, entry: ManifestEntry, path: Path, state: FileState | None) -> None:
        """`path` (read in `state`, taken before the read) matched the entry's sha256."""
        if state is not None and path == self.root / entry.key:
            self.verified[entry.split][entry.key] = state

    def stamp(self, manifest_sha256: str) -> None:
        """Stamp what was verified, once the version's manifest is written, under the lock a
        sync of the split takes (merged with a stamp a sync wrote meanwhile)."""
        for split, files in self.verified.items():
            with file_lock(self.root / f".{split}.lock"):
                merged = read_stamp(self.root, split, manifest_sha256)
                merged.update(files)
                write_stamp(self.root, split, manifest_sha256, merged)
