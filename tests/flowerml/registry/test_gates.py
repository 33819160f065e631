"""flowerml.registry.gates: the champion gate (threshold, tolerance, McNemar's paired test, the
per-class floor), the student gate (threshold, gap to the teacher), and `move_alias`, the one
compare-and-swap that moves an alias on a verdict."""

from __future__ import annotations

import json
from dataclasses import replace
from math import comb

import pytest

from flowerml.io.storage_local import LocalStore
from flowerml.registry.gates import (
    MAX_DECISIONS,
    AliasKeptMoving,
    Gate,
    GateError,
    GateScore,
    PairedUnavailable,
    Scorecard,
    StudentGate,
    decide_promotion,
    decide_student,
    move_alias,
    paired_figures,
)
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import Registry
from tests.helpers.registry_entries import MANIFEST, MODEL, card, weights

# --------------------------------------------------------------------------------------------
# The champion gate


def test_first_promotion_is_decided_by_the_threshold_alone() -> None:
    gate = Gate(threshold=0.95)
    ok, reasons = decide_promotion(Scorecard(0.9612, MANIFEST), None, gate)
    assert ok
    assert reasons == ["test top-1 0.9612 >= threshold 0.9500",
                       "no production model yet: decided by the threshold alone"]
    ok, reasons = decide_promotion(Scorecard(0.9400, MANIFEST), None, gate)
    assert not ok
    assert reasons[0] == "test top-1 0.9400 < threshold 0.9500"


def test_regression_beyond_tolerance_is_rejected_with_the_numbers() -> None:
    champion = Scorecard(0.9610, MANIFEST, version=3)
    ok, reasons = decide_promotion(Scorecard(0.9400, MANIFEST), champion, Gate(0.9, 0.005))
    assert not ok
    assert reasons[1] == ("test top-1 0.9400 vs production v000003 0.9610: "
                          "regression of 0.0210 beyond tolerance 0.0050")


def test_candidate_within_tolerance_of_the_champion_is_promoted() -> None:
    champion = Scorecard(0.9655, MANIFEST, version=3)
    ok, reasons = decide_promotion(Scorecard(0.9612, MANIFEST), champion, Gate())
    assert ok
    assert reasons == ["test top-1 0.9612 >= threshold 0.9500",
                       "test top-1 0.9612 vs production v000003 0.9655: "
                       "-0.0043 within tolerance 0.0050",
                       "paired test not run: no per-image predictions were given; decided on "
                       "top-1 alone"]
    # Exactly at the edges passes despite float rounding (0.9655 - 0.005 is not exact).
    assert decide_promotion(Scorecard(0.9605, MANIFEST), champion, Gate())[0]
    assert decide_promotion(Scorecard(0.95, MANIFEST), None, Gate(threshold=0.95))[0]


def test_threshold_still_applies_when_better_than_the_champion() -> None:
    champion = Scorecard(0.80, MANIFEST, version=1)
    ok, reasons = decide_promotion(Scorecard(0.90, MANIFEST), champion, Gate(threshold=0.95))
    assert not ok
    assert "+0.1000 within tolerance" in reasons[1]


def test_force_promotes_and_says_so() -> None:
    champion = Scorecard(0.99, MANIFEST, version=2)
    ok, reasons = decide_promotion(Scorecard(0.5, MANIFEST), champion, Gate(), force=True)
    assert ok
    assert reasons[-1] == "forced: promoted regardless of the gate"
    assert "regression of 0.4900" in reasons[1]


def test_champion_on_another_test_manifest_must_be_re_evaluated() -> None:
    champion = Scorecard(0.97, "b" * 64, version=2)
    with pytest.raises(ValueError, match="different test manifest: re-evaluate it first"):
        decide_promotion(Scorecard(0.96, MANIFEST), champion, Gate())
    ok, reasons = decide_promotion(Scorecard(0.96, MANIFEST), champion, Gate(), force=True)
    assert ok and "not compared" in reasons[1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": 1.5}, "--threshold must be between 0 and 1 (got 1.5)"),
    ({"threshold": -0.1}, "--threshold must be between 0 and 1 (got -0.1)"),
    ({"threshold": float("nan")}, "--threshold must be between 0 and 1 (got nan)"),
    ({"tolerance": 2}, "--tolerance must be between 0 and 1 (got 2)"),
    ({"class_drop": 1.5}, "--class-drop must be between 0 and 1 (got 1.5)"),
    ({"class_drop": -0.01}, "--class-drop must be between 0 and 1 (got -0.01)"),
])
def test_gate_validates_its_numbers(kwargs: dict, message: str) -> None:
    with pytest.raises(GateError) as caught:
        Gate(**kwargs)
    assert str(caught.value) == message


def test_scorecard_from_card() -> None:
    assert Scorecard.from_card(card(0.97), 4) == Scorecard(0.97, MANIFEST, 4)
    with pytest.raises(RegistryError, match="version 000004 records no metrics.top1"):
        Scorecard.from_card({"metrics": {}}, 4)


# --------------------------------------------------------------------------------------------
# The paired test: McNemar on the discordant images, and the per-class floor


def paired(both_right: int, champion_only: int, candidate_only: int, both_wrong: int = 0,
           outcomes: tuple[list, list] | None = None) -> Scorecard:
    """A candidate scorecard with its image-by-image comparison against production v3."""
    from flowerml.registry.comparison import compare
    from tests.helpers.paired import paired_outcomes, prediction_set

    a, b = outcomes or paired_outcomes(both_right=both_right, a_only=champion_only,
                                       b_only=candidate_only, both_wrong=both_wrong)
    comparison = compare(prediction_set("flowers102:000003", a), prediction_set("run:c", b))
    return Scorecard(comparison.b_top1, MANIFEST, paired=comparison)


def champion_of(candidate: Scorecard) -> Scorecard:
    return Scorecard(candidate.paired.a_top1, MANIFEST, version=3)


def test_a_candidate_a_few_images_worse_is_not_refused_by_mcnemar() -> None:
    # 6,149 test images; the candidate loses 12 images and wins 8: 4 images, 0.07 points.
    candidate = paired(both_right=5900, champion_only=12, candidate_only=8, both_wrong=229)
    ok, reasons = decide_promotion(candidate, champion_of(candidate), Gate(threshold=0.9))
    assert ok, reasons
    assert reasons[2] == ("McNemar exact test vs production v000003: right where it was wrong "
                          "on 8 images, wrong where it was right on 12 (of 6,149; agreement "
                          "99.67%); one-sided p = 0.2517 >= 0.05: not significantly worse")
    assert reasons[3] == "per-class floor: no class drops more than 0.10 below production v000003"


def test_a_clearly_worse_candidate_is_refused_by_mcnemar_even_within_tolerance() -> None:
    # It loses 40 images and wins 12: 28 images, 0.46 points, inside the 0.5-point tolerance.
    candidate = paired(both_right=5900, champion_only=40, candidate_only=12, both_wrong=197)
    champion = champion_of(candidate)
    assert champion.top1 - candidate.top1 < Gate().tolerance
    ok, reasons = decide_promotion(candidate, champion, Gate(threshold=0.9))
    assert not ok
    assert "within tolerance 0.0050" in reasons[1]
    assert reasons[2].startswith("McNemar exact test vs production v000003: right where it was "
                                 "wrong on 12 images, wrong where it was right on 40 (of 6,149")
    # P(X <= 12) for X ~ Binomial(52, 1/2), by hand.
    p = sum(comb(52, k) for k in range(13)) / 2**52
    assert f"{p:.4g}" == "6.377e-05"
    assert reasons[2].endswith("one-sided p = 6.377e-05 < 0.05: significantly worse")
    # The same discordant pairs the other way round: a better candidate is not refused.
    better = paired(both_right=5900, champion_only=12, candidate_only=40, both_wrong=197)
    assert decide_promotion(better, champion_of(better), Gate(threshold=0.9))[0]


def test_the_per_class_floor_names_the_classes_that_drop() -> None:
    from tests.helpers.paired import paired_outcomes

    # 400 images, 100 per class, 95 right in each with production; the candidate gets 15
    # "canterbury bells" (label 3) wrong that production got right, and 11 images right that
    # production got wrong, 3 of them bells: 15 against 11 is nothing to McNemar, but bells
    # fall from 0.95 to 0.83.
    a, b = paired_outcomes(both_right=380, a_only=0, b_only=11, both_wrong=9)
    bells = [i for i, (label, _) in enumerate(a) if label == 3][:15]
    for i in bells:
        a[i], b[i] = (3, 3), (3, 4)
    candidate = paired(0, 0, 0, outcomes=(a, b))
    gate = Gate(threshold=0.5, tolerance=0.05)
    ok, reasons = decide_promotion(candidate, champion_of(candidate), gate)
    assert not ok
    assert "within tolerance" in reasons[1] and "not significantly worse" in reasons[2]
    assert reasons[3] == ("per-class floor: 1 class drops more than 0.10 below production "
                          "v000003: 3 canterbury bells 0.9500 -> 0.8300")
    # A drop of exactly the floor passes (0.95 - 0.83 is not exactly 0.12 in floats).
    assert decide_promotion(candidate, champion_of(candidate), replace(gate, class_drop=0.12))[0]
    assert not decide_promotion(candidate, champion_of(candidate),
                                replace(gate, class_drop=0.119))[0]


def test_without_predictions_the_gate_decides_on_top1_and_says_why() -> None:
    why = "flowers102:000003 has no stored per-image predictions (evaluated before evaluation " \
          "kept them): evaluate its run again"
    candidate = Scorecard(0.96, MANIFEST, paired=PairedUnavailable("flowers102:000003", why))
    ok, reasons = decide_promotion(candidate, Scorecard(0.961, MANIFEST, version=3), Gate())
    assert ok
    assert reasons[2] == f"paired test not run: {why}; decided on top-1 alone"


def test_force_promotes_a_significantly_worse_candidate_and_records_why() -> None:
    candidate = paired(both_right=5900, champion_only=40, candidate_only=12, both_wrong=197)
    ok, reasons = decide_promotion(candidate, champion_of(candidate), Gate(0.9), force=True)
    assert ok and "significantly worse" in reasons[2]
    assert reasons[-1] == "forced: promoted regardless of the gate"


def test_paired_figures_and_the_scorecard_round_trip_through_json() -> None:
    candidate = paired(both_right=5900, champion_only=40, candidate_only=12, both_wrong=197)
    figures = paired_figures(candidate.paired, Gate())
    assert {k: figures[k] for k in ("champion", "ran", "n", "candidate_only", "champion_only",
                                    "significantly_worse", "class_drop",
                                    "classes_below_floor")} == {
        "champion": "flowers102:000003", "ran": True, "n": 6149, "candidate_only": 12,
        "champion_only": 40, "significantly_worse": True, "class_drop": 0.1,
        "classes_below_floor": []}
    assert figures["p_worse"] == pytest.approx(sum(comb(52, k) for k in range(13)) / 2**52)
    assert Scorecard.from_json(json.loads(json.dumps(candidate.to_json()))) == candidate
    missing = Scorecard(0.9, MANIFEST, 2, paired=PairedUnavailable("m:000001", "why"))
    assert Scorecard.from_json(missing.to_json()) == missing
    assert paired_figures(missing.paired, Gate()) == {"champion": "m:000001", "ran": False,
                                                      "reason": "why"}
    assert paired_figures(None, Gate()) is None


# --------------------------------------------------------------------------------------------
# The student gate


@pytest.mark.parametrize(("student", "teacher", "passes", "words"), [
    (0.96, 0.965, True, ["0.9600 >= threshold 0.9500", "gap +0.0050 within max gap 0.0100"]),
    (0.96, 0.97, True, ["gap +0.0100 within max gap 0.0100"]),  # exactly at the bound
    (0.95, 0.99, False, ["0.9500 >= threshold", "gap +0.0400 beyond max gap 0.0100"]),
    (0.94, 0.945, False, ["0.9400 < threshold 0.9500", "within max gap"]),
    (0.99, 0.97, True, ["gap -0.0200 within max gap"]),  # a student may beat its teacher
])
def test_the_student_gate(student: float, teacher: float, passes: bool, words: list[str]) -> None:
    verdict, reasons = decide_student(GateScore(student, MANIFEST), GateScore(teacher, MANIFEST),
                                      StudentGate(threshold=0.95, max_gap=0.01),
                                      teacher_label="flowers102:000003")
    assert verdict is passes
    assert all(any(word in reason for reason in reasons) for word in words), reasons
    assert "vs teacher flowers102:000003" in reasons[1]


def test_the_student_gate_compares_only_the_same_test_manifest() -> None:
    with pytest.raises(GateError, match="measure both on the same one"):
        decide_student(GateScore(0.99, MANIFEST), GateScore(0.99, "n" * 64), StudentGate())


@pytest.mark.parametrize(("threshold", "max_gap", "message"), [
    (1.5, 0.01, "--threshold must be between 0 and 1 (got 1.5)"),
    (0.9, -0.1, "--max-gap must be between 0 and 1 (got -0.1)"),
])
def test_bad_gate_numbers(threshold: float, max_gap: float, message: str) -> None:
    with pytest.raises(GateError) as info:
        StudentGate(threshold=threshold, max_gap=max_gap)
    assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# Moving an alias on a verdict


def test_an_alias_already_at_the_version_is_not_moved(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.97))
    before = registry.set_alias("production", 1, reason="first")
    ok, reasons, state = move_alias(registry, "production", 1, lambda _: (True, ["passes"]),
                                    why="promote")
    assert (ok, reasons) == (True, ["passes", "v000001 is already production: nothing to move"])
    assert state == before and len(registry.history()) == 1


def test_a_refusing_verdict_moves_nothing(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.97))
    assert move_alias(registry, "production", 1, lambda _: (False, ["no"]), why="promote") == (
        False, ["no"], None)
    assert registry.alias() is None and registry.history() == []


def test_move_alias_decides_again_until_the_alias_stops_moving(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    for seed in (1, 2, 3):
        registry.register(weights(seed), card(0.97))
    other = Registry(local_store, MODEL)
    seen: list[int | None] = []

    def decide_while_another_writer_moves_it(current):
        seen.append(current.version if current else None)
        other.set_alias("production", 1 + len(seen) % 2, reason="the other writer")
        return True, ["passes"]

    with pytest.raises(AliasKeptMoving) as caught:
        move_alias(registry, "production", 3, decide_while_another_writer_moves_it,
                   why="promote")
    assert str(caught.value) == (f"alias production of {MODEL} moved {MAX_DECISIONS} times "
                                 "while deciding whether to move it to v000003; try again")
    # Each decision was made again on the alias as the other writer had just left it.
    assert seen == [None] + [1 + n % 2 for n in range(1, MAX_DECISIONS)]
    assert registry.alias().version != 3 and len(registry.history()) == MAX_DECISIONS
