"""The store contract, run against LocalStore and S3Store on two real HTTP endpoints: moto's
and SeaweedFS's (a real S3 server, which checks conditional writes under a lock)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from flowerml.errors import RetriesExhausted, TransientError, UserError
from flowerml.locations import LocationError
from flowerml.storage import (
    LocalStore,
    ObjectNotFound,
    PreconditionFailed,
    S3Options,
    S3Store,
    Store,
    StoreAccessError,
    StoreUnreachable,
    open_store,
    run_bounded,
)
from tests.conftest import free_port, store_keys


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


def test_local_store_hides_temp_and_lock_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("x.json", b"1")
    _, etag = store.get_with_etag("x.json")
    store.put_bytes("x.json", b"2", if_match=etag)
    (tmp_path / ".tmp-leftover").write_bytes(b"partial")
    assert store_keys(store) == ["x.json"]


def test_missing_bucket_is_a_clear_error(moto_endpoint: str, s3_options: S3Options) -> None:
    store = S3Store("no-such-bucket", "", s3_options)
    with pytest.raises(StoreAccessError, match="no-such-bucket.*does not exist"):
        store.check()
    with pytest.raises(StoreAccessError, match="no-such-bucket"):
        store.put_bytes("k", b"v")


@pytest.mark.slow  # starts an auth-enforcing moto server process
def test_access_denied_names_bucket_not_secret(denying_s3_endpoint: str) -> None:
    store = S3Store("guarded", "", S3Options(endpoint_url=denying_s3_endpoint))
    with pytest.raises(StoreAccessError, match="access denied to bucket 'guarded'") as caught:
        store.check()
    with pytest.raises(StoreAccessError):
        store.put_bytes("k", b"v")
    assert "testing-secret" not in str(caught.value)


def test_unreachable_endpoint_is_a_clear_error() -> None:

    port = free_port()
    store = S3Store("bucket", "", S3Options(endpoint_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{port}") as caught:
        store.put_bytes("k", b"v")
    assert "testing-secret" not in str(caught.value)
    assert str(caught.value).endswith("(bucket 'bucket'): connection refused")  # in words


def test_unknown_endpoint_host_is_named() -> None:
    store = S3Store("bucket", "", S3Options(endpoint_url="http://no-such-host.invalid:9000"))
    with pytest.raises(StoreUnreachable) as caught:
        store.check()
    assert str(caught.value) == ("cannot reach S3 endpoint http://no-such-host.invalid:9000 "
                                 "(bucket 'bucket'): unknown host 'no-such-host.invalid'")


def test_open_store_parses_uris(tmp_path: Path, s3_options: S3Options) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", s3=s3_options)
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    assert s3.uri == "s3://bucket/some/prefix"


@pytest.mark.parametrize(("uri", "problem"), [
    ("ftp://example.org/store", "uses an unsupported scheme (ftp://)"),
    ("s3://Bad_Bucket!/x", "has an invalid bucket name"),
    ("s3://", "has no bucket name"),
    ("", "must not be empty"),
])
def test_open_store_refuses_what_is_not_a_store(uri: str, problem: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError) as err:
        open_store(uri, name="FLOWERML_STORE")
    assert str(err.value).startswith("FLOWERML_STORE ") and problem in str(err.value)
    assert "file://PATH or s3://bucket[/prefix]" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no folder named after the bad value


# --------------------------------------------------------------------------------------------
# Upload failures (issue 9): the transfer manager's S3UploadFailedError is translated too.

MULTIPART_TEST_THRESHOLD = 5 * 1024 * 1024  # S3's smallest part; default chunks are 8 MiB


def big_file(tmp_path: Path, size: int = 9 * 1024 * 1024) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x5a" * size)
    return path


def pending_uploads(store: S3Store) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


@pytest.mark.slow  # starts an auth-enforcing moto server process
@pytest.mark.parametrize("multipart", [False, True])
def test_denied_upload_is_an_access_error_not_retried(denying_s3_endpoint: str, tmp_path: Path,
                                                      multipart: bool) -> None:
    store = S3Store("guarded", "p", S3Options(endpoint_url=denying_s3_endpoint))
    store.MULTIPART_THRESHOLD = MULTIPART_TEST_THRESHOLD
    source = big_file(tmp_path) if multipart else tmp_path / "small.bin"
    if not multipart:
        source.write_bytes(b"small")
    with pytest.raises(StoreAccessError,
                       match=r"access denied to bucket 'guarded'.*uploading raw/x.bin "
                             r"to s3://guarded/p") as caught:
        store.put_file("raw/x.bin", source)
    assert "testing-secret" not in str(caught.value)
    # tasks.common.retry_transient never retries a UserError that is not transient
    assert isinstance(caught.value, UserError) and not isinstance(caught.value, TransientError)
    with pytest.raises(StoreAccessError, match="access denied to bucket 'guarded'"):
        store.upload_many([("raw/x.bin", source)])  # small files go as one PutObject


def fail_upload_part(store: S3Store) -> list[int]:
    """Answer every UploadPart with HTTP 500 (after botocore's own retries) and count them."""
    from botocore.awsrequest import AWSResponse

    calls: list[int] = []

    def answer_500(**_: object) -> tuple[AWSResponse, dict]:
        calls.append(1)
        return AWSResponse("http://injected", 500, {}, None), {
            "Error": {"Code": "InternalError", "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 500}}

    store.client.meta.events.register("before-call.s3.UploadPart", answer_500)
    return calls


@pytest.fixture(params=["s3", pytest.param("seaweedfs", marks=pytest.mark.slow)])
def any_s3_store(request: pytest.FixtureRequest) -> S3Store:
    """An S3Store on moto, then on SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_store")


def test_server_error_on_upload_part_is_transient_and_leaves_nothing_pending(
        any_s3_store: S3Store, tmp_path: Path) -> None:
    s3_store = any_s3_store
    s3_store.MULTIPART_THRESHOLD = MULTIPART_TEST_THRESHOLD
    calls = fail_upload_part(s3_store)
    with pytest.raises(StoreUnreachable,
                       match=rf"HTTP 500, uploading raw/big.bin to s3://{s3_store.bucket}/store"):
        s3_store.put_file("raw/big.bin", big_file(tmp_path))
    assert calls  # the multipart path was taken
    assert isinstance(StoreUnreachable("x"), RetriesExhausted)
    assert pending_uploads(s3_store) == []  # the transfer manager aborted it
    assert not s3_store.exists("raw/big.bin")


def test_stale_multipart_uploads_under_the_prefix_are_aborted(s3_store: S3Store,
                                                              tmp_path: Path) -> None:
    client = s3_store.client
    ours = client.create_multipart_upload(Bucket=s3_store.bucket, Key="store/raw/old.bin")
    other = client.create_multipart_upload(Bucket=s3_store.bucket, Key="elsewhere/old.bin")
    s3_store.STALE_UPLOAD_AGE = timedelta(0)  # (moto dates every upload 2010 anyway)
    s3_store.put_file("raw/new.bin", big_file(tmp_path, 1024))  # the first upload sweeps
    left = {u["UploadId"] for u in pending_uploads(s3_store)}
    assert ours["UploadId"] not in left and other["UploadId"] in left
    assert s3_store.get_bytes("raw/new.bin") == b"\x5a" * 1024


@pytest.mark.slow  # a SeaweedFS server process
def test_read_only_credential_gets_an_access_error_on_seaweedfs(
        seaweedfs_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seaweedfs_store.put_bytes("raw/readable.txt", b"r")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reader-secret")
    reader = S3Store(seaweedfs_store.bucket, seaweedfs_store.prefix,
                     S3Options(endpoint_url=seaweedfs_store.endpoint, addressing_style="path"))
    reader.MULTIPART_THRESHOLD = MULTIPART_TEST_THRESHOLD
    assert reader.get_bytes("raw/readable.txt") == b"r"
    small = tmp_path / "small.bin"
    small.write_bytes(b"small")
    for source in (big_file(tmp_path), small):  # multipart, then one PutObject
        with pytest.raises(StoreAccessError, match=rf"access denied to bucket "
                                                   rf"'{reader.bucket}'.*uploading raw/x.bin"
                           ) as caught:
            reader.put_file("raw/x.bin", source)
        assert "reader-secret" not in str(caught.value)
    assert pending_uploads(seaweedfs_store) == [] and not seaweedfs_store.exists("raw/x.bin")


def test_the_write_probe_passes_and_leaves_nothing(store: Store) -> None:
    store.check()
    store.check_writable()
    assert store_keys(store) == []
    if isinstance(store, LocalStore):
        assert [p.name for p in store.root.iterdir()] in ([], [LocalStore.LOCK_DIR])


def test_the_write_probe_makes_no_store_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not" / "yet")
    store.check_writable()  # its parent is writable: the folder can be made when needed
    assert not (tmp_path / "not").exists()


def test_the_write_probe_refuses_a_read_only_credential_on_seaweedfs(
        seaweedfs_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only key passes `check` (head_bucket) and every read: the probe's create-only
    write is what it is refused."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reader-secret")
    reader = S3Store(seaweedfs_store.bucket, seaweedfs_store.prefix,
                     S3Options(endpoint_url=seaweedfs_store.endpoint, addressing_style="path"))
    reader.check()
    with pytest.raises(StoreAccessError) as caught:
        reader.check_writable()
    assert str(caught.value).startswith(f"cannot write to the store {reader.uri}: access denied "
                                        f"to bucket '{reader.bucket}'")
    assert "reader-secret" not in str(caught.value)
    assert store_keys(seaweedfs_store) == []


def test_temp_files_under_a_prefix_are_removed_by_its_writer(local_store: LocalStore) -> None:
    local_store.put_bytes("v/a/x.jpg", b"x")
    (local_store.root / "v/a/.tmp-0123456789abcdef.jpg").write_bytes(b"cut short")
    (local_store.root / "w/.tmp-fedcba9876543210.jpg").parent.mkdir()
    (local_store.root / "w/.tmp-fedcba9876543210.jpg").write_bytes(b"another prefix's")
    with local_store.writing_under("v"):
        assert sorted(p.name for p in (local_store.root / "v/a").iterdir()) == ["x.jpg"]
    assert (local_store.root / "w/.tmp-fedcba9876543210.jpg").exists()
