"""The registry tasks' words: the promotion report's paired-test section, and the gate read
from the flow's parameters."""

from __future__ import annotations

from flowerml.comparison import compare
from flowerml.promotion import Gate, PairedUnavailable, paired_figures
from tasks.registry import gate_of, paired_section
from tests.paired import paired_outcomes, prediction_set


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
