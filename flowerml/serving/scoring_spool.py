"""A listing spooled to local disk once, and hashed: the input id of `flowerml score`.

INPUT's keys (`flowerml.serving.inputs.InputListing`) are streamed into a file of one JSON-encoded key
per line, never held in memory, while a sha256 of the format, the root, the shard size and
every key, in order, is taken: the same collection scored with the same shard size gets the
same id, and so the same output folder. Shards are read back from the file, one at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from flowerml.serving.inputs import InputListing, is_image_name

LISTING_FORMAT = 1
"""Part of every input id: bumped if the shard layout changes, so old outputs are not reused."""


@dataclass(frozen=True)
class Spooled:
    """The listing written to a local file, one JSON-encoded key per line, and its hash;
    `skipped` counts the files of a folder, glob or prefix not named like images."""

    path: Path
    count: int
    images: int
    digest: str
    skipped: int = 0


def spool_listing(listing: InputListing, shard_size: int, folder: Path,
                  exclude: str | None = None) -> Spooled:
    """Stream the keys to disk once, hashing them (with the root and shard size, which decide
    what each shard holds) and counting those named like images. Keys under `exclude` (an
    output folder inside the input) are left out, and so are a folder's, glob's or prefix's
    files not named like images (`InputListing.only_images`)."""
    digest = hashlib.sha256(f"flowerml-listing-v{LISTING_FORMAT}\n{listing.root}\n"
                            f"{shard_size}\n".encode())
    path, count, images, skipped = folder / "listing.jsonl", 0, 0, 0
    with open(path, "w", encoding="utf-8") as spool:
        for key in listing.stream():
            if exclude and key.startswith(exclude):
                continue
            is_image = is_image_name(key)
            if listing.only_images and not is_image:
                skipped += 1
                continue
            line = json.dumps(key) + "\n"
            spool.write(line)
            digest.update(line.encode())
            count += 1
            images += is_image
    return Spooled(path, count, images, digest.hexdigest(), skipped)


def spooled_shards(spooled: Spooled, shard_size: int) -> Iterator[list[str]]:
    with open(spooled.path, encoding="utf-8") as spool:
        while lines := list(islice(spool, shard_size)):
            yield [json.loads(line) for line in lines]

