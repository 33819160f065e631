"""flowerml.promotion: the pure gate, judging against a fairly measured champion, and promoting
by compare-and-swap (deciding again when another promotion moved the alias first)."""

from __future__ import annotations

import json
from dataclasses import replace

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
                       "-0.0043 within tolerance 0.0050"]
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
