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


def test_a_failed_int8_gate_is_a_line_of_the_summary(registered_run, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A version promoted whose int8 failed its gate: the reasons and a line under the onnx
    one say it serves on fp32."""
    from flowerml.evaluation.predictions import run_predictions
    from flowerml.registry.gates import INT8_FAILED
    from flowerml.settings import load_settings
    from flows.retrain_summary import print_retrain_summary

    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(registered_run.cache))
    settings = load_settings(store=str(registered_run.store.root))
    version = run_predictions(registered_run.store, "tiny").dataset.partition("@")[2]
    export = {"location": "/s/model.onnx", "bytes": 2e6, "parity_passed": True,
              "top1_agreement": 1.0, "max_abs_logit_diff": 1e-5, "int8_passed": False,
              "int8_top1_agreement": 0.9, "int8_top1_delta": -0.04, "int8_images": 24,
              "int8_bytes": 5e5, "int8_images_per_second": 90.0}
    print_retrain_summary({"promoted": True, "version": 2, "run_id": "tiny",
                           "dataset_version": version, "reasons": [INT8_FAILED],
                           "metrics": {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5,
                                       "n": 24}, "export": export},
                          "flowers102", "production", settings)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PROMOTED: flowers102 version 2")
    assert f"  - {INT8_FAILED}" in lines
    onnx = next(i for i, line in enumerate(lines) if line.startswith("onnx: "))
    assert lines[onnx + 1] == (
        "int8 FAILED its gate (top-1 agreement with fp32 90.00%, test top-1 -4.00 points on 24 "
        "test images; 0.5 MB, 90.0 images/s): the version is promoted and served on fp32 "
        "ONNX; --runtime auto will not take int8")
