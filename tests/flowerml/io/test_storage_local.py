"""flowerml.io.storage_local: LocalStore's own behaviour: its temp and lock files hidden from
listings and removed by the writer of their prefix, and a write probe that makes no folder."""

from __future__ import annotations

from pathlib import Path

from flowerml.io.storage_local import LocalStore
from tests.helpers.stores import store_keys


def test_local_store_hides_temp_and_lock_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("x.json", b"1")
    _, etag = store.get_with_etag("x.json")
    store.put_bytes("x.json", b"2", if_match=etag)
    (tmp_path / ".tmp-leftover").write_bytes(b"partial")
    assert store_keys(store) == ["x.json"]


def test_the_write_probe_makes_no_store_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not" / "yet")
    store.check_writable()  # its parent is writable: the folder can be made when needed
    assert not (tmp_path / "not").exists()


def test_temp_files_under_a_prefix_are_removed_by_its_writer(local_store: LocalStore) -> None:
    local_store.put_bytes("v/a/x.jpg", b"x")
    (local_store.root / "v/a/.tmp-0123456789abcdef.jpg").write_bytes(b"cut short")
    (local_store.root / "w/.tmp-fedcba9876543210.jpg").parent.mkdir()
    (local_store.root / "w/.tmp-fedcba9876543210.jpg").write_bytes(b"another prefix's")
    with local_store.writing_under("v"):
        assert sorted(p.name for p in (local_store.root / "v/a").iterdir()) == ["x.jpg"]
    assert (local_store.root / "w/.tmp-fedcba9876543210.jpg").exists()
