"""Which failures the tasks retry."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from flowerml.errors import DownloadError, LabelsError, SourceError
from flowerml.storage import StoreAccessError, StoreUnreachable
from tasks.common import retry_transient


@pytest.mark.parametrize(("error", "retried"), [
    (DownloadError("503 after retries"), True),
    (StoreUnreachable("no answer"), True),
    (ConnectionResetError("reset"), True),
    (SourceError("MD5 mismatch"), False),
    (LabelsError("missing key"), False),
    (StoreAccessError("denied"), False),
])
def test_retries_only_transient_failures(error: Exception, retried: bool) -> None:
    assert retry_transient(None, None, Failed(data=error)) is retried
