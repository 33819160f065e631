"""flowerml's configuration: the one place that reads the environment.

Every value comes from `FLOWERML_*` variables or a `.env` file in the working directory, read
once at the edge (the CLI, a Prefect task) and unpacked into explicit arguments; a CLI option
(`load_settings(store=...)`) wins over both. S3 credentials and endpoints are not ours: boto3's
standard chain (`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, profiles) provides them; the `s3_*`
fields only override it.

A bad value is one `SettingsError` line naming where it came from: the option (`--store`), the
variable (`FLOWERML_STORE`), or the variable in the .env file (with the file's path). Values are
not echoed (an endpoint URL may carry credentials), except a store that is refused, shown as
`flowerml.io.locations` shows it (credentials and queries stripped). The cache directory is checked
when the settings are read: a file in its place, or a folder this process cannot write in, is
refused naming FLOWERML_CACHE_DIR and the path, before any command starts work.
"""

from __future__ import annotations

import errno
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowerml.core.errors import SettingsError
from flowerml.io.locations import LocalLocation, LocationError, parse_store
from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_open import open_store
from flowerml.io.urls import url_problem

ChecksumWhen = Literal["when_supported", "when_required"]

ENV_PREFIX = "FLOWERML_"
DOTENV = ".env"
"""Read from the working directory only (no search of its parents)."""

_DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_REGION = re.compile(r"^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")
"""botocore's rule for a region name (a host label), checked here so that a bad one is a line
naming FLOWERML_S3_REGION rather than botocore's InvalidRegionError."""


class Settings(BaseSettings):
    """All of flowerml's settings, with their defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=DOTENV, env_file_encoding="utf-8", extra="ignore"
    )

    store: str = Field(
        "./flowerml-store",
        description="Object store: a folder path, file://PATH, or s3://bucket[/prefix].",
    )
    dataset: str = Field("flowers102", description="Dataset name under datasets/ on the store.")
    cache_dir: Path = Field(Path("./flowerml-cache"), validate_default=True,
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
    download_timeout: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False,
                                    description="Seconds without progress before a retry.")

    @field_validator("store")
    @classmethod
    def _store_is_usable(cls, value: str) -> str:
        try:
            location = parse_store(value)
        except LocationError as error:
            raise ValueError(error.detail) from None
        if isinstance(location, LocalLocation):
            problem = _unresolvable(location.path) or _file_in_the_way(location.path)
            if problem:
                raise ValueError(problem)
        return value.strip()

    @field_validator("dataset")
    @classmethod
    def _dataset_is_a_name(cls, value: str) -> str:
        if not _DATASET_NAME.match(value):
            raise ValueError("must be 1-63 characters of a-z, 0-9, '.', '_' and '-', "
                             "beginning with a letter or digit")
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_dir_is_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")  # Path("") would be the working directory
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_is_writable(cls, value: Path) -> Path:
        problem = _unresolvable(value) or _file_in_the_way(value) or _not_writable(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("s3_endpoint_url", "s3_region")
    @classmethod
    def _s3_override_reads(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Empty is unset; a value must be an http(s) URL (endpoint) or a region name."""
        if not value:
            return None
        check = _endpoint_problem if info.field_name == "s3_endpoint_url" else _region_problem
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking server that mirrors runs and registry versions "
                          "(else MLFLOW_TRACKING_URI; unset: no tracking).")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow's own variable, used when FLOWERML_MLFLOW_URI is not set.")
    mlflow_required: bool = Field(
        True, description="Refuse to train when the MLflow server cannot be reached at "
                          "start (false: a warning, and the run trains untracked).")

    def tracking_uri(self) -> str | None:
        """The MLflow tracking server to mirror to: FLOWERML_MLFLOW_URI (or --mlflow), else
        MLFLOW_TRACKING_URI; None when neither is set (or set empty)."""
        return (self.mlflow_uri or "").strip() or (self.mlflow_tracking_uri or "").strip() \
            or None

    def s3_options(self) -> S3Options:
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            addressing_style=self.s3_addressing_style,
            request_checksum_calculation=self.s3_request_checksum_calculation,
            response_checksum_validation=self.s3_response_checksum_validation,
        )



def _endpoint_problem(value: str) -> str | None:
    problem = url_problem(value)
    if problem == "is not an http(s) URL":
        return "must start with http:// or https://"
    return f"the URL {problem}" if problem else None


def _region_problem(value: str) -> str | None:
    if _REGION.match(value):
        return None
    return "must be a region name: letters, digits and '-' (like eu-west-1)"

def build_store(settings: Settings) -> Store:
    """The store the settings name, with their S3 overrides and transfer concurrency."""
    return open_store(settings.store, s3=settings.s3_options(),
                      concurrency=settings.transfer_concurrency)


def load_settings(**overrides: object) -> Settings:
    """Read the settings now, with explicit overrides (from CLI options) winning; a None
    override is unset. Bad values raise one `SettingsError` line naming where each came from."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, set(given))) from None
    except UnicodeDecodeError:
        raise SettingsError(_undecodable_dotenv()) from None
    except OSError as error:
        if error.filename is None or Path(error.filename).name != DOTENV:
            raise
        raise SettingsError(f"cannot read {_dotenv_path()}: {error.strerror}") from None


# --- checks on the folders a setting names -------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists (or cannot be looked at)."""
    current = path
    while current != current.parent:
        try:
            current.stat()
            return current
        except FileNotFoundError:
            current = current.parent
        except OSError:  # ENOTDIR (a file among the parents), EACCES: stop here and report it
            return current
    return current


def _absolute(path: Path) -> Path:
    """`path` from the root, as messages name it (a relative one depends on where you are)."""
    try:
        return path.expanduser().absolute()
    except OSError:  # the working directory was removed
        return path.expanduser()


def _unresolvable(folder: Path) -> str | None:
    """Why `folder` cannot be resolved to a place (a symbolic link loop on its way), or None."""
    try:
        _absolute(folder).resolve()
    except (RuntimeError, OSError) as error:  # 3.11 raises RuntimeError for a loop, 3.13 OSError
        reason = "a symbolic link loop" if "loop" in str(error).lower() else str(error)
        return f"{_absolute(folder)} cannot be used: {reason} on its path"
    return None


def _file_in_the_way(folder: Path) -> str | None:
    """Why `folder` cannot be a folder (it, or one of its parents, is a file), or None."""
    folder = _absolute(folder)
    existing = _nearest_existing(folder)
    while not existing.exists() and existing != existing.parent:  # inside a file: find it
        existing = existing.parent
    if existing.is_dir():
        return None
    if existing == folder:
        return f"{folder} is a file, not a folder"
    return f"{folder} cannot be a folder: {existing} is a file"


def _not_writable(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (or in the parent it would be created in), or
    None. Creates nothing: a nameless temporary file (O_TMPFILE) is the probe, which also
    answers truly for root and for read-only or virtual filesystems, where os.access does not."""
    folder = _absolute(folder)
    existing = _nearest_existing(folder)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        # ENOENT from a folder that exists (procfs) says nothing useful: leave it out.
        reason = f" ({error.strerror})" if error.strerror and error.errno != errno.ENOENT else ""
        if existing == folder:
            return f"{folder} is not writable{reason}"
        return f"{folder} cannot be created: {existing} is not writable{reason}"
    return None


# --- describing what is wrong ----------------------------------------------------------------


def _dotenv_path() -> Path:
    try:
        return Path.cwd() / DOTENV
    except OSError:  # the working directory was removed
        return Path(DOTENV)


def _dotenv_names() -> set[str]:
    """The variable names the .env file sets, upper-cased (pydantic-settings ignores case)."""
    from dotenv import dotenv_values

    path = Path(DOTENV)
    if not path.is_file():
        return set()
    try:
        return {name.upper() for name in dotenv_values(path, encoding="utf-8")}
    except (OSError, UnicodeDecodeError):
        return set()


def _origin(field: str, overrides: set[str], dotenv: set[str]) -> str:
    """Where a field's value came from, as the user would name it."""
    if field in overrides:
        return f"--{field.replace('_', '-')}"
    variable = f"{ENV_PREFIX}{field.upper()}"
    if any(name.upper() == variable for name in os.environ):
        return f"setting {variable}"
    if variable in dotenv:
        return f"setting {variable} in {_dotenv_path()}"
    return f"setting {variable} (not set: its default)"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _reason(item: dict[str, Any]) -> str:
    """Pydantic's complaint in words, without its "Value error," or "Input should" wording."""
    kind, ctx = item["type"], item.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "finite_number":
        try:
            is_nan = math.isnan(float(item["input"]))
        except (TypeError, ValueError):
            is_nan = False
        return "not a number (NaN)" if is_nan else "must be a finite number"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "not a number"
    bounds = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
              "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}
    if kind in bounds:
        key, words = bounds[kind]
        return f"must be {words} {_number(ctx[key])}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    message = str(item["msg"])
    return "should" + message[len("Input should"):] if message.startswith("Input should") else message


def describe_validation_error(error: ValidationError, overrides: set[str] | None = None) -> str:
    """One line naming each bad field where it came from (an option in `overrides`, a variable,
    or the .env file), with the reason in words."""
    overrides = overrides or set()
    dotenv = _dotenv_names()
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "settings"
        parts.append(f"invalid {_origin(field, overrides, dotenv)}: {_reason(item)}")
    return "; ".join(parts)


def _undecodable_dotenv() -> str:
    """The .env file is not UTF-8: name it and the line, not the bytes (they may be a secret)."""
    where = ""
    try:
        raw = Path(DOTENV).read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        where = f" (line {line})"
    except OSError:
        pass
    return (f"cannot read {_dotenv_path()}: not UTF-8 text{where}; flowerml reads .env files "
            "as UTF-8, save it in that encoding")
