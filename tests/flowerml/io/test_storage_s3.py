"""flowerml.io.storage_s3: S3Store's own behaviour on moto and SeaweedFS: every boto3 failure
(a missing bucket, a refused credential, an unreachable endpoint, a failed upload) as one typed
error without secrets, and abandoned multipart uploads swept."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from flowerml.core.errors import RetriesExhausted, TransientError, UserError
from flowerml.io.storage import S3Options, StoreAccessError, StoreUnreachable
from flowerml.io.storage_s3 import S3Store, build_boto3_session, build_s3_client
from tests.helpers.multipart import MULTIPART_TEST_THRESHOLD, big_file, pending_uploads
from tests.helpers.network import free_port
from tests.helpers.stores import store_keys


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


# --------------------------------------------------------------------------------------------
# Upload failures (issue 9): the transfer manager's S3UploadFailedError is translated too.


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


def test_clients_share_the_parsed_service_models_but_not_their_credentials(
        moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task builds its store's client anew: S3's service model is read from disk for the
    first only, and each client still takes the credentials the environment holds then."""
    import botocore.loaders

    options = S3Options(endpoint_url=moto_endpoint)
    build_s3_client(options)
    reads: list[str] = []
    original = botocore.loaders.JSONFileLoader.load_file

    def counted(self, file_path, *args, **kwargs):
        reads.append(file_path)
        return original(self, file_path, *args, **kwargs)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", counted)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-key")
    second = build_boto3_session(None)
    client = second.client("s3", endpoint_url=moto_endpoint)
    assert reads == []
    assert second.get_credentials().access_key == "second-key"
    assert client.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
    paths = second._session.get_component("data_loader").search_paths  # noqa: SLF001
    assert len(paths) == len(set(paths))  # boto3's data folder once, however many sessions
