"""`S3Store`: the store contract (`flowerml.io.storage.Store`) on a bucket of AWS S3 or any
S3-compatible endpoint, and the boto3 client behind it.

This is the only module that imports boto3 (and botocore): every S3 call is made here, and
every boto3 failure is translated here into the store's typed errors, without credentials in
their messages. botocore's standard retry mode owns the S3 retry policy (`build_s3_client`);
what is left after it is `StoreUnreachable`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowerml.core.errors import SettingsError
from flowerml.core.files import size_text, write_atomically
from flowerml.io.storage import (
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    S3Options,
    Store,
    StoreAccessError,
    StoreError,
    StoreUnreachable,
    check_key,
)
from flowerml.io.urls import redact_url


class S3Store(Store):
    """A bucket (and optional prefix) on AWS S3 or any S3-compatible endpoint."""

    MULTIPART_THRESHOLD = 64 * 1024 * 1024
    STALE_UPLOAD_AGE = timedelta(days=1)
    """A multipart upload pending longer than this was abandoned (a killed process)."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None,
                 concurrency: int = 16) -> None:
        super().__init__(concurrency)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = build_s3_client(options or S3Options(), concurrency)
        self.endpoint = self.client.meta.endpoint_url
        self.shown_endpoint = redact_url(self.endpoint or "")
        """The endpoint as messages show it: without user:password@ (a URL may carry them)."""
        self._sweep_guard = threading.Lock()
        self._swept = False

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"bucket '{self.bucket}' at {self.shown_endpoint}"

    def _translate(self, error: Exception, key: str | None = None) -> Exception:
        """Map a boto3 failure to our typed errors; messages never carry credentials."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            EndpointResolutionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(error, EndpointResolutionError):  # its text echoes the URL, credentials too
            return SettingsError(f"invalid S3 endpoint {self.shown_endpoint} (from "
                                 f"{ENDPOINT_ORIGINS}): not a URL S3 can be reached at")
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return StoreAccessError(f"no usable AWS credentials for {self._where()} (set "
                                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
        if isinstance(error, ConnectionError | HTTPClientError):
            cause = connection_failure(error, urlsplit(self.endpoint or "").hostname)
            return StoreUnreachable(f"cannot reach S3 endpoint {self.shown_endpoint} "
                                    f"(bucket '{self.bucket}'): {cause}")
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreAccessError(f"{self._where()} does not exist")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"{key}: not found in {self.uri}")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(f"{key}: precondition failed ({code})")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "ExpiredToken"):
                return StoreAccessError(f"access denied to {self._where()} ({code})")
            if status is not None and status >= 500:
                return StoreUnreachable(f"S3 endpoint {self.shown_endpoint} failed: HTTP "
                                        f"{status}")
        return error

    @contextlib.contextmanager
    def _translated(self, key: str | None = None) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            translated = self._translate(error, key)
            if translated is error:
                raise
            raise translated from None
        except S3UploadFailedError as error:
            raise self._translate_upload(error, key) from None

    def _translate_upload(self, error: Exception, key: str | None) -> Exception:
        """The transfer manager wraps the ClientError of a failed PutObject, multipart step or
        part in S3UploadFailedError (raised inside its `except`, so it is the context): map
        that cause as any other, and name the key and bucket (its own text names the local
        file and the service's message, never credentials)."""
        from botocore.exceptions import BotoCoreError, ClientError

        cause = error.__cause__ or error.__context__
        where = f"uploading {key} to {self.uri}"
        if isinstance(cause, ClientError | BotoCoreError):
            translated = self._translate(cause, key)
            if translated is not cause:
                return type(translated)(f"{translated}, {where}")
            if isinstance(cause, ClientError):
                code = cause.response.get("Error", {}).get("Code", "")
                return StoreError(f"S3 refused {where} at {self.shown_endpoint} ({code})")
        return StoreError(f"{where} at {self.shown_endpoint} failed: {type(error).__name__}")

    def check(self) -> None:
        try:
            with self._translated():
                self.client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound:  # head_bucket has no body, so a missing bucket is a bare 404
            raise StoreAccessError(f"{self._where()} does not exist") from None

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        with self._translated(key):
            return self.client.put_object(**args)["ETag"]

    def get_with_etag(self, key: str, *, limit: int | None = None) -> tuple[bytes, str]:
        with self._translated(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if limit is not None and response["ContentLength"] > limit:
                response["Body"].close()
                raise ObjectTooLarge(f"{key} in {self.uri}: larger than {size_text(limit)}, "
                                     "the limit for this object")
            return response["Body"].read(), response["ETag"]

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD,
                              max_concurrency=self.concurrency, use_threads=True)

    def put_file(self, key: str, path: Path) -> str:
        self._abort_stale_uploads_once()
        # A failed multipart upload is aborted by the transfer manager itself (its failure
        # cleanup); one left behind by a killed process is swept by the next store's first
        # upload (`_abort_stale_uploads_once`).
        with self._translated(key):
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    Config=self._transfer_config())
        info = self.head(key)
        return info.etag if info else ""

    def _abort_stale_uploads_once(self) -> None:
        with self._sweep_guard:
            if self._swept:
                return
            self._swept = True
        self.abort_stale_uploads()

    def abort_stale_uploads(self, older_than: timedelta | None = None) -> int:
        """Abort the multipart uploads under our prefix begun more than `older_than` ago
        (default STALE_UPLOAD_AGE): their parts cost storage and no one will complete them.
        Best effort: a credential without ListBucketMultipartUploads skips it. Returns how
        many were aborted."""
        from botocore.exceptions import BotoCoreError, ClientError

        cutoff = datetime.now(UTC) - (self.STALE_UPLOAD_AGE if older_than is None
                                      else older_than)
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket,
                                           Prefix=f"{self.prefix}/" if self.prefix else ""):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket,
                                                           Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        except (BotoCoreError, ClientError):
            pass
        return aborted

    def get_file(self, key: str, path: Path) -> Path:
        def download(temp: Path) -> None:
            with self._translated(key):
                self.client.download_file(self.bucket, self._key(key), str(temp),
                                          Config=self._transfer_config())

        return write_atomically(path, download)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._translated(key):
                response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, response["ContentLength"], response["ETag"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with self._translated(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"][strip:], item["Size"], item["ETag"])

    def delete(self, key: str) -> None:
        with self._translated(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def connection_failure(error: BaseException, host: str | None = None) -> str:
    """Why a connection (to `host`) failed, in words, from the socket error that botocore and
    urllib3 wrap; the exception's class name when there is none."""
    import socket

    unknown_host = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
    cause: BaseException | None = error
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, socket.gaierror):
            if cause.errno in unknown_host:
                return f"unknown host '{host}'" if host else "unknown host"
            return f"host name lookup failed ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, TimeoutError):
            return "timed out"
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


def build_s3_client(options: S3Options, concurrency: int = 16) -> Any:
    """A boto3 S3 client: the standard AWS chain, with our overrides on top."""
    from botocore.config import Config

    config_args: dict[str, Any] = {
        "max_pool_connections": max(10, concurrency * 2),
        "retries": {"max_attempts": 4, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if options.addressing_style:
        config_args["s3"] = {"addressing_style": options.addressing_style}
    if options.request_checksum_calculation:
        config_args["request_checksum_calculation"] = options.request_checksum_calculation
    if options.response_checksum_validation:
        config_args["response_checksum_validation"] = options.response_checksum_validation
    try:
        session = build_boto3_session(options.region)
        return session.client("s3", endpoint_url=options.endpoint_url,
                              config=Config(**config_args))
    except Exception as error:  # noqa: BLE001 - botocore's configuration errors, below
        refused = aws_configuration_problem(error, options)
        if refused is None:
            raise
        raise refused from None


_data_loader: list[Any] = []
"""This process's botocore data loader, once built (`build_boto3_session`)."""
_data_loader_guard = threading.Lock()


def build_boto3_session(region: str | None) -> Any:
    """A boto3 session of its own (credentials, region and configuration resolved afresh, as
    `boto3.session.Session()` does) whose data loader, the parsed service models, is the one
    every session of this process shares: each would otherwise parse S3's model again, 88 of
    the 98 ms of CPU a client costs here (10 ms shared), and every task and command builds its
    store's client anew."""
    import boto3
    import botocore.session

    core = botocore.session.Session()
    with _data_loader_guard:
        if not _data_loader:
            _data_loader.append(core.get_component("data_loader"))
    loader = _data_loader[0]
    core.register_component("data_loader", loader)
    session = boto3.session.Session(botocore_session=core, region_name=region)
    with _data_loader_guard:  # boto3 adds its data folder to the search path of each session
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


ENDPOINT_ORIGINS = "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or endpoint_url in the AWS config"
"""Where boto3 takes an S3 endpoint from when FLOWERML_S3_ENDPOINT_URL does not set one."""


def aws_configuration_problem(error: Exception, options: S3Options) -> SettingsError | None:
    """A bad value in the AWS configuration chain that boto3 refuses when it builds a client,
    as one line naming where it comes from (the value shown without credentials), or None."""
    from botocore.exceptions import ConfigParseError, InvalidRegionError, ProfileNotFound

    if isinstance(error, ProfileNotFound):
        return SettingsError(f"invalid setting AWS_PROFILE: no profile "
                             f"'{error.kwargs.get('profile')}' in the AWS config or credentials "
                             "file (~/.aws/config, ~/.aws/credentials)")
    if isinstance(error, ConfigParseError):
        return SettingsError(f"cannot read the AWS config file {error.kwargs.get('path')}: it "
                             "is not valid INI")
    if isinstance(error, InvalidRegionError):
        origin = ("setting FLOWERML_S3_REGION" if options.region else
                  "AWS region (AWS_REGION, AWS_DEFAULT_REGION or region in the AWS config)")
        return SettingsError(f"invalid {origin}: '{error.kwargs.get('region_name')}' is not a "
                             "region name (letters, digits and '-', like eu-west-1)")
    if isinstance(error, ValueError) and str(error).startswith("Invalid endpoint"):
        origin = ("setting FLOWERML_S3_ENDPOINT_URL" if options.endpoint_url else
                  f"S3 endpoint ({ENDPOINT_ORIGINS})")
        shown = redact_url(str(error).removeprefix("Invalid endpoint:").strip())
        return SettingsError(f"invalid {origin}: '{shown}' is not an http:// or https:// URL")
    return None
