"""The registry tasks' words: the promotion report's paired-test section, and the gate read
from the flow's parameters."""

from __future__ import annotations

from flowerml.registry.comparison import compare
from flowerml.registry.gates import Gate, PairedUnavailable, paired_figures
from tasks.registry import gate_of, paired_section
from tests.helpers.paired import paired_outcomes, prediction_set


def test_the_report_shows_the_paired_figures_and_the_classes_below_the_floor() -> None:
    champion, candidate = paired_outcomes(both_right=90, a_only=8, b_only=1, both_wrong=1)
    paired = compare(prediction_set("flowers102:000001", champion),
                     prediction_set("run:r2", candidate))
    text = "\n".join(paired_section(paired_figures(paired, Gate(class_drop=0.05))))
    assert "## Paired test against flowers102:000001" in text
    assert "| right only with the candidate | 1 |" in text
    assert "| right only with production | 8 |" in text
    assert "| McNemar exact, one-sided p (candidate worse) | 0.01953 (significantly worse at " \
           "0.05) |" in text
    assert "Classes more than 0.05 below production: 1 pink primrose (1.0000 -> 0.9200)" in text


def test_the_report_says_when_the_paired_test_could_not_run() -> None:
    figures = paired_figures(PairedUnavailable("flowers102:000001", "no predictions"), Gate())
    assert paired_section(figures)[-1] == "Not run: no predictions. Decided on top-1 alone."
    assert paired_section(None) == []  # no production model: nothing to compare with


def test_the_gate_reads_class_drop_and_defaults_it_for_older_parameters() -> None:
    assert gate_of({"threshold": 0.5, "tolerance": 0.01, "class_drop": 0.2}) == Gate(
        0.5, 0.01, 0.2)
    assert gate_of({"threshold": 0.5, "tolerance": 0.01}).class_drop == Gate.class_drop


def test_the_event_says_promoted_or_rejected_whatever_the_exports_parity(
        prefect_harness: None, monkeypatch) -> None:
    """Automations match `flowerml.model.promoted`: the export's own verdict must not leak in."""
    from prefect import flow

    import tasks.registry as registry_tasks

    emitted: list[str] = []
    real_emit = registry_tasks.emit_event
    monkeypatch.setattr(registry_tasks, "emit_event",
                        lambda **kwargs: emitted.append(kwargs["event"]) or real_emit(**kwargs))
    export = {"parity_passed": True, "location": "s3://b/m.onnx", "bytes": 10,
              "top1_agreement": 1.0, "max_abs_logit_diff": 1e-6,
              "torch_images_per_second": 1.0, "onnx_images_per_second": 2.0}

    @flow
    def decide(promoted: bool) -> None:
        registry_tasks.announce("flowers102", {
            "promoted": promoted, "version": 1, "run_id": "r", "dataset_version": "v",
            "metrics": {"top1": 0.9}, "reasons": [], "alias": "production", "export": export})

    decide(True)
    decide(False)
    assert emitted == ["flowerml.model.promoted", "flowerml.model.rejected"]
