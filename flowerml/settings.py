"""flowerml's configuration: the one place that reads the environment.

Every value comes from `FLOWERML_*` variables or a `.env` file, read once at the edge (the
CLI, a Prefect task) and unpacked into explicit arguments. S3 credentials and endpoints are not
ours: boto3's standard chain (`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, profiles) provides
them; the `s3_*` fields only override it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowerml.errors import SettingsError
from flowerml.storage import S3Options, Store, open_store

ChecksumWhen = Literal["when_supported", "when_required"]


class Settings(BaseSettings):
    """All of flowerml's settings, with their defaults."""

    model_config = SettingsConfigDict(
        env_prefix="FLOWERML_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    store: str = Field(
        "./flowerml-store",
        description="Object store: a local directory, or s3://bucket[/prefix].",
    )
    dataset: str = Field("flowers102", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
                         description="Dataset name under datasets/ on the store.")
    cache_dir: Path = Field(Path("./flowerml-cache"),
                            description="Local cache for downloads and synced splits.")

    s3_endpoint_url: str | None = Field(
        None, description="Override the S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS config).")
    s3_region: str | None = Field(None, description="Override the S3 region.")
    s3_addressing_style: Literal["auto", "virtual", "path"] | None = Field(
        None, description="S3 addressing style; 'path' for most self-hosted stores.")
    s3_request_checksum_calculation: ChecksumWhen | None = Field(
        None, description="boto3 request_checksum_calculation; 'when_required' for stores "
                          "that reject the newer default checksums.")
    s3_response_checksum_validation: ChecksumWhen | None = Field(
        None, description="boto3 response_checksum_validation.")

    transfer_concurrency: int = Field(16, ge=1, le=256,
                                      description="Parallel object transfers.")
    download_retries: int = Field(5, ge=0, le=50,
                                  description="Retries for each source download.")
    download_timeout: float = Field(60.0, gt=0, le=3600,
                                    description="Seconds without progress before a retry.")

    @field_validator("store")
    @classmethod
    def _store_is_usable(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("must be a directory path, file://PATH or s3://bucket[/prefix]")
        if value.startswith("s3://") and not value[5:].split("/", 1)[0]:
            raise ValueError("s3:// URI needs a bucket name")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value or None


    def s3_options(self) -> S3Options:
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            addressing_style=self.s3_addressing_style,
            request_checksum_calculation=self.s3_request_checksum_calculation,
            response_checksum_validation=self.s3_response_checksum_validation,
        )


def build_store(settings: Settings) -> Store:
    """The store the settings name, with their S3 overrides and transfer concurrency."""
    return open_store(settings.store, s3=settings.s3_options(),
                      concurrency=settings.transfer_concurrency)


def describe_validation_error(error: ValidationError, prefix: str = "FLOWERML_") -> str:
    """One line naming each bad field as its environment variable, without echoing values."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "settings"
        parts.append(f"{prefix}{field.upper()}: {item['msg']}")
    return "invalid setting " + "; ".join(parts)


def load_settings(**overrides: object) -> Settings:
    """Read the settings now, with explicit overrides (from CLI options) winning."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None
