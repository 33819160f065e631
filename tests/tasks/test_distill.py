"""The distillation tasks' adapters: what the student release is asked to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.distillation import distill as distill_module
from tasks.distill import release_student_task


class Asked(Exception):
    """Stops the release once the task has said what it asks for."""


@pytest.mark.parametrize("workers", [0, 3, None])
def test_the_release_evaluates_with_the_runs_dataloader_workers(
        workers: int | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The flow's `runner.workers` reaches the student's evaluations (they once started one
    DataLoader process per core whatever the run asked for)."""
    asked: dict = {}

    def release_student(store, run_id, **options):
        asked.update(options, run_id=run_id)
        raise Asked

    monkeypatch.setattr(distill_module, "release_student", release_student)
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Asked):
        release_student_task.fn("distill-1", None, "production", {}, store=str(tmp_path),
                                device="cpu", workers=workers)
    assert asked["run_id"] == "distill-1" and asked["workers"] == workers
    assert asked["device"] == "cpu" and asked["promote"] is True
