"""Which failures the tasks retry."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from flowerml.core.errors import (
    DownloadError,
    DownloadRetriesExhausted,
    LabelsError,
    RetriesExhausted,
    SourceError,
)
from flowerml.io.storage import StoreAccessError, StoreUnreachable
from tasks.common import retry_transient


@pytest.mark.parametrize(("error", "retried"), [
    (DownloadError("503 after retries"), True),
    (DownloadError("HTTP 501, not retried by the download"), True),
    (DownloadRetriesExhausted("HTTP 503 after FLOWERML_DOWNLOAD_RETRIES"), False),
    (RetriesExhausted("retried to its limit below"), False),
    (StoreUnreachable("no answer after botocore's retries"), False),
    (ConnectionResetError("reset"), True),
    (SourceError("MD5 mismatch"), False),
    (LabelsError("missing key"), False),
    (StoreAccessError("denied"), False),
])
def test_retries_only_transient_failures(error: Exception, retried: bool) -> None:
    assert retry_transient(None, None, Failed(data=error)) is retried
