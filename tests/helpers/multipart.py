"""Multipart uploads in tests: a file that S3Store uploads in two parts once its threshold is
S3's smallest part, and the uploads a bucket still holds pending."""

from __future__ import annotations

from pathlib import Path

from flowerml.io.storage_s3 import S3Store

MULTIPART_TEST_THRESHOLD = 5 * 1024 * 1024  # S3's smallest part; default chunks are 8 MiB


def big_file(tmp_path: Path, size: int = 9 * 1024 * 1024) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x5a" * size)
    return path


def pending_uploads(store: S3Store) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])

