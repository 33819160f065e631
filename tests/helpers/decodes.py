"""Which splits this process decodes (`flowerml.data.cache`), on which thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest


class Decode(NamedTuple):
    thread: str
    file: str  # the decoded cache's file name: "<split>-<R>px-..."


def record_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Decode]:
    """Every split decoded from now on (a cache that is reused decodes nothing)."""
    import flowerml.data.cache

    decodes: list[Decode] = []
    original = flowerml.data.cache.decode_into

    def recording(path: Path, files: list[Path], *args: Any, **kwargs: Any) -> None:
        decodes.append(Decode(threading.current_thread().name, path.name))
        original(path, files, *args, **kwargs)

    monkeypatch.setattr(flowerml.data.cache, "decode_into", recording)
    return decodes
