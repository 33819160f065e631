"""The store contract, run against LocalStore and S3Store on two real HTTP endpoints: moto's
and SeaweedFS's (a real S3 server, which checks conditional writes under a lock)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flowerml.io.storage import ObjectNotFound, PreconditionFailed, Store, run_bounded
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from tests.helpers.multipart import MULTIPART_TEST_THRESHOLD, big_file, pending_uploads
from tests.helpers.stores import store_keys


@pytest.fixture(params=["local", "s3", pytest.param("seaweedfs", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest) -> Store:
    """Each contract test runs against every implementation and S3 server."""
    return request.getfixturevalue(f"{request.param}_store")


def test_put_get_head_list_delete(store: Store) -> None:
    etag = store.put_bytes("a/b/one.txt", b"one")
    store.put_bytes("a/two.txt", b"two!")
    store.put_bytes("c.txt", b"c")
    assert store.get_bytes("a/b/one.txt") == b"one"
    head = store.head("a/b/one.txt")
    assert head is not None and head.size == 3 and head.etag == etag
    assert store.head("a/missing") is None
    assert not store.exists("a/missing") and store.exists("c.txt")
    assert store_keys(store, "a/") == ["a/b/one.txt", "a/two.txt"]
    assert store_keys(store) == ["a/b/one.txt", "a/two.txt", "c.txt"]
    store.delete("a/two.txt")
    store.delete("a/two.txt")  # absent is fine
    assert store_keys(store, "a/") == ["a/b/one.txt"]


def test_get_missing_raises_not_found(store: Store) -> None:
    with pytest.raises(ObjectNotFound, match="nothing/here"):
        store.get_bytes("nothing/here")


def test_create_only_never_overwrites(store: Store) -> None:
    store.put_bytes("v/COMMITTED", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("v/COMMITTED", b"second", if_none_match=True)
    assert store.get_bytes("v/COMMITTED") == b"first"


def test_put_if_absent_tells_the_one_creator(store: Store) -> None:
    assert store.put_if_absent("v/CLAIM", b"mine") is True
    assert store.put_if_absent("v/CLAIM", b"theirs") is False
    assert store.get_bytes("v/CLAIM") == b"mine"


def test_compare_and_swap(store: Store) -> None:
    store.put_bytes("alias.json", b"v1")
    data, etag = store.get_with_etag("alias.json")
    assert data == b"v1"
    new_etag = store.put_bytes("alias.json", b"v2", if_match=etag)
    assert new_etag != etag
    with pytest.raises(PreconditionFailed):
        store.put_bytes("alias.json", b"v3", if_match=etag)  # stale etag loses
    assert store.get_bytes("alias.json") == b"v2"


def test_compare_and_swap_race_has_one_winner_per_round(store: Store,
                                                        request: pytest.FixtureRequest) -> None:
    # Not a value any worker writes: S3 etags are content hashes, so a worker rewriting the
    # same bytes keeps the etag, and a second swap from it rightly succeeds.
    store.put_bytes("alias.json", b"start")
    wins: list[int] = []
    start = threading.Barrier(8)

    def contend(worker: int) -> None:
        _, etag = store.get_with_etag("alias.json")
        start.wait()
        try:
            store.put_bytes("alias.json", str(worker).encode(), if_match=etag)
            wins.append(worker)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if request.node.callspec.params["store"] != "s3":  # moto checks, then writes, unlocked
        assert len(wins) == 1
    assert store.get_bytes("alias.json").decode() in {str(w) for w in wins}


def test_files_round_trip(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    store.put_file("raw/big.bin", source)
    dest = store.get_file("raw/big.bin", tmp_path / "out" / "big.bin")
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(ObjectNotFound):
        store.get_file("raw/none.bin", tmp_path / "out" / "none.bin")
    assert not (tmp_path / "out" / "none.bin").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["big.bin"]  # no temp files left


def test_multipart_files_round_trip(store: Store, tmp_path: Path) -> None:
    if isinstance(store, S3Store):
        store.MULTIPART_THRESHOLD = MULTIPART_TEST_THRESHOLD  # 2 parts: 8 MiB + 1 MiB
    source = big_file(tmp_path)
    etag = store.put_file("raw/multi.bin", source)
    info = store.head("raw/multi.bin")
    assert info is not None and (info.size, info.etag) == (source.stat().st_size, etag)
    if isinstance(store, S3Store):
        assert etag.strip('"').endswith("-2")  # a multipart object's etag counts its parts
        assert pending_uploads(store) == []
    assert store.get_file("raw/multi.bin", tmp_path / "out.bin").read_bytes() == \
        source.read_bytes()


def test_upload_and_download_many_with_progress(store: Store, tmp_path: Path) -> None:
    items = ((f"many/{i:03d}.bin", bytes([i]) * (i + 1)) for i in range(50))
    sizes: list[int] = []
    assert store.upload_many(items, progress=sizes.append) == 50
    assert sorted(sizes) == list(range(1, 51))
    assert len(store_keys(store, "many/")) == 50
    pairs = [(f"many/{i:03d}.bin", tmp_path / "dl" / f"{i:03d}.bin") for i in range(50)]
    assert store.download_many(pairs) == 50
    assert (tmp_path / "dl" / "049.bin").read_bytes() == bytes([49]) * 50


def test_invalid_keys_are_refused(store: Store) -> None:
    for key in ("../evil", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(key, b"x")


def test_run_bounded_raises_first_error_and_bounds_in_flight() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            seen.append(item)
        if item == 5:
            raise RuntimeError("boom 5")
        return 1

    with pytest.raises(RuntimeError, match="boom 5"):
        run_bounded(work, iter(range(1000)), concurrency=2)
    assert len(seen) < 1000  # stopped consuming the stream after the failure


def test_the_write_probe_passes_and_leaves_nothing(store: Store) -> None:
    store.check()
    store.check_writable()
    assert store_keys(store) == []
    if isinstance(store, LocalStore):
        assert [p.name for p in store.root.iterdir()] in ([], [LocalStore.LOCK_DIR])
