"""Scoring in tests: a folder of photos as a user hands it over (with the files scoring must
skip or report), its keys in listing order, and the rows a scoring run wrote to a folder."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.helpers.images import write_jpeg, write_truncated_jpeg

PHOTO_KEYS = ["a.jpg", "b.jpg", "c.png", "cut.jpg", "d.jpg", "e.jpg", "sub/f.jpg", "sub/g.jpeg"]
"""The keys of `write_photos`'s folder in listing order (sorted, hidden files and notes.txt,
not named like an image, left out as `flowerml predict` leaves them out of a folder)."""


def write_photos(folder: Path) -> Path:
    """7 photos (one large, two in a subfolder), a note, a truncated JPEG and a hidden file."""
    for index, (name, width, height) in enumerate([
            ("a.jpg", 90, 60), ("b.jpg", 60, 90), ("c.png", 64, 64), ("d.jpg", 2400, 1600),
            ("e.jpg", 57, 80), ("sub/f.jpg", 120, 70), ("sub/g.jpeg", 45, 45)]):
        path = write_jpeg(folder / name, width, height, seed=index)
        if name.endswith(".png"):
            Image.open(path).save(path, format="PNG")
    (folder / "notes.txt").write_text("not a photo")
    write_truncated_jpeg(folder / "cut.jpg")
    (folder / ".hidden.jpg").write_bytes(b"macOS metadata")
    return folder


def rows_in_folder(summary: dict) -> list[dict]:
    """The rows of a scoring run whose output is a local folder, part after part."""
    folder = Path(summary["output"])
    return [json.loads(line) for part in summary["parts"]
            for line in (folder / part).read_text().splitlines()]
