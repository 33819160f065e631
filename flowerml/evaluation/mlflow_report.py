"""An evaluation added to its run's MLflow run, when tracking is on: the figures (top-1, top-5,
mean class accuracy, loss) as metrics `<split>_<name>`, the report and its plots as artifacts
under `eval/<split>/` (`flowerml evaluate` and the retrain flow's evaluate task call it)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowerml.io.storage import ObjectNotFound, Store
from flowerml.tracking.server import TrackingServer
from flowerml.tracking.training_runs import log_evaluation
from flowerml.training.runs import RunFiles

EVALUATION_FILES = ("report.md", "per_class.json", "confusion.png", "curves.png")
"""What an evaluation adds to its MLflow run as artifacts (predictions.jsonl stays on the store)."""


def mirror_evaluation(tracking_uri: str | None, store: Store, run_id: str, split: str,
                      summary: Mapping[str, Any]) -> bool:
    """Add the evaluation of `run_id` on `split` (its `summary` figures and the report's files
    on the store) to the run's MLflow run; False (one warning line) when it was not done, and
    at once when `tracking_uri` is None."""
    if not tracking_uri:
        return False
    run = RunFiles(store, run_id)
    with tempfile.TemporaryDirectory(prefix="flowerml-mlflow-") as temp:
        files = []
        for name in EVALUATION_FILES:
            with contextlib.suppress(ObjectNotFound):
                store.get_file(run.key(f"eval/{split}/{name}"), Path(temp) / name)
                files.append(Path(temp) / name)
        return log_evaluation(TrackingServer(tracking_uri), dataset=run.record().dataset.name,
                              run_id=run_id, split=split, metrics=summary, files=files)
