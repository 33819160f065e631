"""Labelled images to add to a published dataset (`flowerml ingest --add`): a folder of class
folders, a .csv or .jsonl list of them, and an image copied out of a published split."""

from __future__ import annotations

import json
from pathlib import Path

from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage import Store
from tests.helpers.images import write_jpeg


def class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """`root/<folder>/new_<i>.jpg`, `counts[folder]` distinct photo-like JPEGs per folder
    (a folder name is a label number or a class name, as SOURCE takes them)."""
    for offset, (folder, count) in enumerate(counts.items()):
        for index in range(count):
            write_jpeg(root / folder / f"new_{index}.jpg", 40, 32,
                       seed=seed * 1000 + offset * 100 + index)
    return root


def split_folders(root: Path, per_split: int = 2,
                  classes: tuple[str, ...] = ("tulip", "daisy", "Rose")) -> Path:
    """`root/{train,valid,test}/<class>/new_<i>.jpg`, every image distinct: a dataset of one's
    own classes as `imagefolder:PATH` takes it."""
    for seed, split in enumerate(("train", "valid", "test"), start=1):
        class_folders(root / split, dict.fromkeys(classes, per_split), seed=seed)
    return root


def csv_list(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n")
    return path


def jsonl_list(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def copy_published_image(store: Store, published: PublishedDataset, split: str,
                         dest: Path) -> Path:
    """The bytes of `split`'s first image of `published`, written to `dest`."""
    entry = published.split_files(split)[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(store.get_bytes(published.object_key(entry)))
    return dest
