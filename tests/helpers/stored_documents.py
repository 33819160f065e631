"""Stored documents as flowerml wrote them before their pydantic models (the files under
tests/flowerml/fixtures/documents/): each document's reader must still read them."""

from __future__ import annotations

from pathlib import Path

DOCUMENTS = Path(__file__).resolve().parents[1] / "flowerml" / "fixtures" / "documents"


def fixture_bytes(name: str) -> bytes:
    """The stored bytes of fixture document `name` (e.g. "manifest.json")."""
    return (DOCUMENTS / name).read_bytes()
