"""Stores in tests: the keys a store holds, hard-linked copies of built trees (a store with its
cache), replacing a file of such a copy, and what a sync downloads and reports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore


class StoreAndCache(NamedTuple):
    """A local store and the cache directory that goes with it."""

    store: LocalStore
    cache: Path


def store_keys(store: Store, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def copy_tree(pristine: Path, dest: Path) -> Path:
    """A test's own copy of a built tree, made of hard links (instant, no disk): the stores and
    caches replace files atomically and never write into one, so a copy changes only itself.
    Lock files are left out, so that copies never share a lock."""
    shutil.copytree(pristine, dest, copy_function=os.link, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.lock"))
    return dest


def replace_file(path: Path, data: bytes) -> None:
    """Replace a file of a `copy_tree` copy (never write into it: it shares the pristine one)."""
    path.unlink()
    path.write_bytes(data)


class Recorder:
    """A Progress that remembers its calls."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, int | None]] = []
        self.advanced = 0

    def start(self, stage: str, total: int | None) -> None:
        self.stages.append((stage, total))

    def advance(self, amount: int = 1) -> None:
        self.advanced += amount


def count_downloads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key `store.get_file` is asked for from now on."""
    keys: list[str] = []
    original = store.get_file

    def get_file(key: str, path: Path) -> Path:
        keys.append(key)
        return original(key, path)

    monkeypatch.setattr(store, "get_file", get_file)
    return keys
