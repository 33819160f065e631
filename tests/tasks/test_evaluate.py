"""tasks/evaluate.py: preparing the test split ahead never fails the run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import tasks.evaluate
from flowerml.core.priority import idle_priority_available
from tasks.evaluate import prepare_evaluation_split_task


@pytest.mark.skipif(not idle_priority_available(), reason="per-thread scheduling is Linux's")
def test_a_split_that_cannot_be_prepared_is_a_warning_and_the_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The evaluation meets the same problem itself, and reports it there."""
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks.evaluate, "get_run_logger",
                        lambda: logging.getLogger("prepare-evaluation-split"))
    with caplog.at_level(logging.WARNING, logger="prepare-evaluation-split"):
        result = prepare_evaluation_split_task.fn(
            "test", "resnet18", "none", 32, store=str(tmp_path / "store"),
            dataset="flowers102", dataset_version="0123456789ab")
    assert result["split"] == "test" and result["decoded"] == 0
    assert result["skipped"].startswith("dataset 'flowers102' version '0123456789ab' is not "
                                        "published")
    assert [r.getMessage() for r in caplog.records] == [
        f"the test split was not prepared ahead: {result['skipped']}"]
    assert not (tmp_path / "cache").exists()
