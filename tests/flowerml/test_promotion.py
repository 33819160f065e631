"""flowerml.promotion: the pure gate, judging against a fairly measured champion, and promoting
by compare-and-swap (deciding again when another promotion moved the alias first)."""

from __future__ import annotations

import json
from dataclasses import replace
from math import comb

import pytest

from flowerml.promotion import Gate, Scorecard, champion_scorecard, decide_promotion, promote
from flowerml.registry import Registry, RegistryError, resolve_ref
from flowerml.storage import LocalStore, Store
from tests.builders import MANIFEST, MODEL, card, weights
from tests.flowerml.conftest import RegisteredRun

# --------------------------------------------------------------------------------------------
# The gate


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
    with pytest.raises(RegistryError) as caught:
        Gate(**kwargs)
    assert str(caught.value) == message


def test_scorecard_from_card() -> None:
    assert Scorecard.from_card(card(0.97), 4) == Scorecard(0.97, MANIFEST, 4)
    with pytest.raises(RegistryError, match="version 000004 records no metrics.top1"):
        Scorecard.from_card({"metrics": {}}, 4)


# --------------------------------------------------------------------------------------------
# Promoting: the gate, then the alias moved by compare-and-swap


def test_promote_moves_the_alias_and_rollback_restores_it(store: Store) -> None:
    registry = Registry(store, MODEL)
    for seed, top1 in ((1, 0.96), (2, 0.97)):
        registry.register(weights(seed), card(top1))
    assert registry.alias() is None

    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.96, MANIFEST))
    assert ok and "no production model yet" in reasons[1]
    assert (state.version, state.seq, state.previous) == (1, 1, None)
    champion = Scorecard(0.96, MANIFEST, version=1)
    ok, reasons, state = promote(registry, 2, scorecard=Scorecard(0.97, MANIFEST),
                                 champion=champion)
    assert ok and "vs production v000001 0.9600: +0.0100" in reasons[1]
    assert (state.version, state.seq, state.previous) == (2, 2, 1)
    assert registry.alias() == state
    assert registry.resolve().version == 2
    assert resolve_ref(store, "flowers102@production").version == 2

    rolled = registry.rollback()
    assert (rolled.version, rolled.seq, rolled.previous) == (1, 3, 2)
    assert registry.resolve("production").version == 1
    history = registry.history()
    assert [(h["seq"], h["from"], h["to"]) for h in history] == [(1, None, 1), (2, 1, 2),
                                                                 (3, 2, 1)]
    assert history[1]["reason"].startswith("promote: test top-1 0.9700 >= threshold")
    assert history[2]["reason"] == "rollback" and history[2]["forced"] is False
    assert set(history[0]) >= {"seq", "from", "to", "reason", "forced", "time"}
    alias_doc = json.loads(store.get_bytes(f"registry/{MODEL}/aliases/production.json"))
    assert alias_doc["alias"] == "production" and alias_doc["seq"] == 3
    assert alias_doc["sha256"] == registry.get(1).weights_sha256
    assert store.exists(f"registry/{MODEL}/aliases/production/history/00000003.json")


def test_rejected_promotion_moves_nothing(store: Store) -> None:
    registry = Registry(store, MODEL)
    registry.register(weights(1), card(0.90))
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.90, MANIFEST))
    assert not ok and state is None
    assert reasons[0] == "test top-1 0.9000 < threshold 0.9500"
    assert registry.alias() is None and registry.history() == []


def test_forced_promotion_is_recorded(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.90))
    ok, _, state = promote(registry, 1, scorecard=Scorecard(0.90, MANIFEST), force=True)
    assert ok and state.version == 1
    entry = registry.history()[0]
    assert entry["forced"] is True and "forced: promoted regardless" in entry["reason"]


def test_a_version_whose_onnx_export_failed_parity_needs_force(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    for seed in (1, 2):
        registry.register(weights(seed), card(0.99))
    registry.attach(1, "export.json", json.dumps({"sha256": "0" * 64, "parity": {
        "passed": False}}).encode())
    registry.attach(2, "export.json", json.dumps({"sha256": "0" * 64, "parity": {
        "passed": True}}).encode())
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.99, MANIFEST))
    assert not ok and state is None and registry.alias() is None
    assert reasons[-1] == "its ONNX export failed the parity check (see export.json)"
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.99, MANIFEST), force=True)
    assert ok and state.version == 1 and "forced: promoted regardless" in reasons[-1]
    ok, _, state = promote(registry, 2, scorecard=Scorecard(0.99, MANIFEST))
    assert ok and state.version == 2  # a passing export does not stand in the way


def test_promote_decides_again_when_the_champion_changed(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    for seed, top1 in ((1, 0.95), (2, 0.99), (3, 0.96)):
        registry.register(weights(seed), card(top1))
    registry.set_alias("production", 1, reason="first")
    other = Registry(local_store, MODEL)

    class Interleaved(Registry):
        """Another writer promotes v2 between our read of the alias and our history entry."""

        moved = False

        def _entry(self, *args: object, **kwargs: object) -> dict:
            if not Interleaved.moved:
                Interleaved.moved = True
                other.set_alias("production", 2, reason="the other promotion")
            return super()._entry(*args, **kwargs)

    racing = Interleaved(local_store, MODEL)
    ok, reasons, state = promote(racing, 3, scorecard=Scorecard(0.96, MANIFEST),
                                 champion=Scorecard(0.95, MANIFEST, version=1))
    # Against v1 (0.95) it would pass; against v2 (0.99, read from its card) it is rejected.
    assert not ok and state is None
    assert "vs production v000002 0.9900: regression of 0.0300" in reasons[1]
    assert registry.alias().version == 2
    assert [h["to"] for h in registry.history()] == [1, 2]


# --------------------------------------------------------------------------------------------
# Judging: the champion's score on the candidate's test manifest


def test_champion_on_the_same_manifest_is_read_from_its_card(
        registered_run: RegisteredRun) -> None:
    from flowerml.manifest import resolve_dataset

    store, cache, registry, metrics = registered_run
    published = resolve_dataset(store, "flowers102")
    score = champion_scorecard(registry, published, alias="production", cache_dir=cache,
                               device="cpu")
    assert (score.top1, score.version) == (metrics["top1"], 1)


def test_champion_on_another_manifest_is_re_evaluated(registered_run: RegisteredRun,
                                                     monkeypatch) -> None:
    import flowerml.inference as inference
    from flowerml.manifest import resolve_dataset

    store, cache, registry, metrics = registered_run
    published = resolve_dataset(store, "flowers102")
    calls: list[str] = []
    original = inference.evaluate_model

    def counting(*args, **kwargs):
        calls.append("evaluated")
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "evaluate_model", counting)
    moved = replace(published, manifest_sha256="0" * 64)
    score = champion_scorecard(registry, moved, alias="production", cache_dir=cache,
                               device="cpu", workers=0)  # no DataLoader worker processes
    assert calls == ["evaluated"]
    assert score.test_manifest_sha256 == "0" * 64 and score.version == 1
    assert score.top1 == pytest.approx(metrics["top1"])  # same weights, same test images


def test_no_production_model_means_no_champion(registered_run: RegisteredRun) -> None:
    from flowerml.manifest import resolve_dataset

    store, cache, _, _ = registered_run
    published = resolve_dataset(store, "flowers102")
    assert champion_scorecard(Registry(store, "tulips"), published, alias="production",
                              cache_dir=cache) is None


# --------------------------------------------------------------------------------------------
# The paired test: McNemar on the discordant images, and the per-class floor


def paired(both_right: int, champion_only: int, candidate_only: int, both_wrong: int = 0,
           outcomes: tuple[list, list] | None = None) -> Scorecard:
    """A candidate scorecard with its image-by-image comparison against production v3."""
    from flowerml.comparison import compare
    from tests.paired import paired_outcomes, prediction_set

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
    from tests.paired import paired_outcomes

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
    from flowerml.promotion import PairedUnavailable

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
    from flowerml.promotion import PairedUnavailable, paired_figures

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


def test_promote_compares_the_stored_predictions_of_both_versions(
        local_store: LocalStore) -> None:
    from tests.paired import paired_outcomes, register_with_predictions

    registry = Registry(local_store, MODEL)
    champion, worse = paired_outcomes(both_right=900, a_only=40, b_only=12, both_wrong=48)
    register_with_predictions(registry, 1, champion)
    register_with_predictions(registry, 2, worse)
    registry.set_alias("production", 1, reason="first")
    gate = Gate(threshold=0.5, tolerance=0.05)
    ok, reasons, state = promote(registry, 2, scorecard=Scorecard.from_card(
        registry.get(2).card, 2), gate=gate)
    assert not ok and state is None and registry.alias().version == 1
    assert "within tolerance 0.0500" in reasons[1]
    assert "right where it was wrong on 12 images, wrong where it was right on 40" in reasons[2]
    assert "significantly worse" in reasons[2] and "not significantly" not in reasons[2]


def test_judge_candidate_compares_the_run_with_production_image_by_image(
        registered_run: RegisteredRun) -> None:
    from flowerml.comparison import Comparison
    from flowerml.promotion import judge_candidate

    store, cache, _, metrics = registered_run
    version = json.loads(store.get_bytes("datasets/flowers102/CURRENT"))["version"]
    ok, reasons, candidate, champion = judge_candidate(
        store, "flowers102", "production", metrics["top1"], "flowers102", version,
        Gate(threshold=0.0), force=False, cache_dir=cache, device="cpu", run_id="tiny")
    assert ok and champion.version == 1
    assert isinstance(candidate.paired, Comparison)
    assert (candidate.paired.a, candidate.paired.b) == ("flowers102:000001", "run:tiny")
    assert candidate.paired.n == metrics["n"] and candidate.paired.discordant == 0
    assert reasons[2].startswith("McNemar exact test vs production v000001: right where it "
                                 "was wrong on 0 images, wrong where it was right on 0")
    # Without the run, nobody looked: the gate says so.
    _, reasons, candidate, _ = judge_candidate(
        store, "flowers102", "production", metrics["top1"], "flowers102", version,
        Gate(threshold=0.0), force=False, cache_dir=cache, device="cpu")
    assert candidate.paired is None and reasons[2].startswith("paired test not run")


def test_a_champion_re_evaluated_on_another_manifest_brings_its_new_predictions(
        registered_run: RegisteredRun) -> None:
    from flowerml.manifest import resolve_dataset
    from flowerml.promotion import measure_champion

    store, cache, registry, metrics = registered_run
    moved = replace(resolve_dataset(store, "flowers102"), manifest_sha256="0" * 64)
    champion = measure_champion(registry, moved, alias="production", cache_dir=cache,
                                device="cpu", workers=0)
    assert champion.label == "flowers102:000001"
    predictions = champion.predictions
    assert predictions.manifest_sha256 == "0" * 64  # measured there, not read from the card
    assert len(predictions.images) == metrics["n"]
    assert predictions.top1 == pytest.approx(champion.scorecard.top1)
    assert predictions.weights_sha256 == registry.get(1).weights_sha256
