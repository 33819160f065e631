"""The typed exceptions of flowerml.

`UserError` and its subclasses are bad input: the CLI prints their message on one line and
exits 2. Anything else is a bug or an outage and keeps its traceback. `TransientError` marks
what is worth retrying (Prefect tasks retry only these); `RetriesExhausted` marks a transient
failure whose own layer has already spent its retries, which no outer layer retries again.
"""

from __future__ import annotations


class FlowermlError(Exception):
    """Base of every error flowerml raises on purpose."""

    kind = "error"
    """Its category in `--json` failure output: bad-input, not-found, refused, denied,
    unavailable."""


class UserError(FlowermlError):
    """Bad input or configuration: one clear line, exit code 2."""

    kind = "bad-input"


class SettingsError(UserError):
    """A FLOWERML_* setting (or CLI option) has an invalid value."""


class TransientError(FlowermlError):
    """A failure that may pass on retry (network, 5xx, throttling)."""

    kind = "unavailable"


class RetriesExhausted(TransientError):
    """A transient failure that the layer owning its retry policy already retried to its limit.

    Outer layers (Prefect task retries) must not retry it again, or the attempts multiply.
    """


class SourceError(UserError):
    """A source file is missing, corrupt, or not what it claims to be."""


class DownloadError(TransientError):
    """A download failed after its retries, for a reason that might pass later."""


class DownloadRetriesExhausted(DownloadError, RetriesExhausted):
    """A download that failed after every retry flowerml.io.download allows (``retries``, from
    FLOWERML_DOWNLOAD_RETRIES): the Prefect fetch task does not retry it again."""


class ArchiveError(SourceError):
    """The tar archive is truncated, corrupt, or holds a member we refuse."""


class LabelsError(SourceError):
    """imagelabels.mat or setid.mat is missing a key or holds inconsistent values."""


class LeakageError(UserError):
    """The same image (by sha256) sits in two splits."""


class DatasetNotFound(UserError):
    """A dataset or version is not published on the store."""

    kind = "not-found"


class DataError(UserError):
    """A bad preset or split, a manifest that does not check out, or local files that do not
    match it."""
