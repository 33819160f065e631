"""What a finished `flowerml retrain` prints (flows/retrain_summary.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.retrain_summary import example_image


def test_the_suggested_image_is_one_the_model_got_right(registered_run, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from flowerml.evaluation.predictions import run_predictions
    from flowerml.settings import load_settings

    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(registered_run.cache))
    settings = load_settings(store=str(registered_run.store.root))
    predictions = run_predictions(registered_run.store, "tiny")
    version = predictions.dataset.partition("@")[2]
    folder = registered_run.cache / "flowers102" / version
    right = [row.key for row in predictions.images if row.correct]
    wrong = [row.key for row in predictions.images if not row.correct]
    assert right and wrong  # the tiny model gets some of its 24 test images right, not all
    image = example_image(settings, "tiny", version)
    assert image == folder / right[0] and image.is_file()
    # Without stored predictions (a run evaluated by an older flowerml): the first image.
    fallback = example_image(settings, "no-such-run", version)
    assert fallback == sorted(folder.glob("test/*/*.jpg"))[0]
