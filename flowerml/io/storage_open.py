"""Opening a store by URI: `open_store` turns a folder path, `file://PATH` or
`s3://bucket[/prefix]` into the `LocalStore` or `S3Store` it names."""

from __future__ import annotations

from flowerml.core.errors import UserError
from flowerml.io.locations import LocalLocation, parse_store
from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store


def open_store(uri: str, *, s3: S3Options | None = None, concurrency: int = 16,
               name: str = "store") -> Store:
    """The store a URI names: a folder path, file://PATH or s3://bucket[/prefix]
    (`flowerml.io.locations.parse_store`, which refuses anything else naming it as `name`)."""
    where = parse_store(uri, name)
    if isinstance(where, LocalLocation):
        try:
            return LocalStore(where.path, concurrency=concurrency)
        except (RuntimeError, OSError) as error:  # Path.resolve: a symbolic link loop
            reason = "a symbolic link loop" if "loop" in str(error).lower() else str(error)
            raise UserError(f"{name} {where.path} cannot be used: {reason} on its path"
                            ) from None
    return S3Store(where.bucket, where.prefix, s3, concurrency=concurrency)
