"""The scoring tasks' words: `flowerml.model.drift` emitted from inside a flow when the run's
drift is above its threshold, never below it or without figures, and the report's section."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.score import drift_section


def summary_with(psi_confidence: float, psi_classes: float, threshold: float = 0.2) -> dict:
    histograms = {"images": 40, "confidence": [0] * 9 + [40], "classes": [10] * 4}
    drifted = max(psi_confidence, psi_classes) > threshold
    return {"model": "flowers102", "version": 3, "label": "flowers102:000003",
            "input": "s3://photos/week-12/", "output": "s3://scores/flowers102/000003/abc",
            "drift": {"scored": histograms, "baseline": histograms,
                      "psi_confidence": psi_confidence, "psi_classes": psi_classes,
                      "threshold": threshold, "drifted": drifted}}


def test_drift_is_an_event_above_the_threshold_and_nothing_below(
        prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow

    import tasks.score as score_tasks

    emitted: list[dict[str, Any]] = []
    real_emit = score_tasks.emit_event
    monkeypatch.setattr(score_tasks, "emit_event",
                        lambda **kwargs: emitted.append(kwargs) or real_emit(**kwargs))

    @flow
    def finish(summary: dict) -> None:
        score_tasks.announce_drift(summary)

    finish(summary_with(0.05, 0.19))  # both at most the threshold
    finish({**summary_with(0, 0), "drift": None, "drift_unavailable": "no baseline"})
    assert emitted == []
    finish(summary_with(0.41, 0.02))
    [event] = emitted
    assert event["event"] == "flowerml.model.drift"
    assert event["resource"] == {"prefect.resource.id": "flowerml.model.flowers102",
                                 "prefect.resource.name": "flowers102"}
    assert event["payload"] == {"version": 3, "psi_confidence": 0.41, "psi_classes": 0.02,
                                "threshold": 0.2, "images": 40,
                                "input": "s3://photos/week-12/",
                                "output": "s3://scores/flowers102/000003/abc"}


def test_the_report_gives_both_indexes_the_verdict_and_the_review_file() -> None:
    found = drift_section({**summary_with(0.41, 0.02), "review": {
        "file": "s3://scores/x/review.jsonl", "below": 0.5, "images": 12}})
    assert "**drift found** against the version's test baseline (threshold 0.2):" in found
    assert "- PSI of top-1 probability: 0.4100" in found
    assert "- PSI of predicted class: 0.0200" in found
    assert found[-1] == ("12 images below top-1 probability 0.5 to label: "
                         "`s3://scores/x/review.jsonl`")
    assert drift_section({"drift_unavailable": "no image was scored"})[-1] == (
        "Not measured: no image was scored")
