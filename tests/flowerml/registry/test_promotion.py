"""flowerml.registry.promotion: judging against a fairly measured champion, and promoting past a gate
by compare-and-swap (deciding again when another promotion moved the alias first); a student
past its own gate."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.registry.gates import Gate, Scorecard
from flowerml.registry.promotion import champion_scorecard, promote, promote_released_student
from flowerml.registry.versions import Registry, resolve_ref
from tests.helpers.paired import top1_of
from tests.helpers.registry_entries import MANIFEST, MODEL, card, weights
from tests.helpers.stored_documents import fixture_bytes
from tests.helpers.synthetic import RegisteredRun

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
    record = json.loads(fixture_bytes("export.json"))
    for version, passed in ((1, False), (2, True)):
        record["parity"]["passed"] = passed
        registry.attach(version, "export.json", json.dumps(record).encode())
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.99, MANIFEST))
    assert not ok and state is None and registry.alias() is None
    assert reasons[-1] == "its ONNX export failed the parity check (see export.json)"
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.99, MANIFEST), force=True)
    assert ok and state.version == 1 and "forced: promoted regardless" in reasons[-1]
    ok, _, state = promote(registry, 2, scorecard=Scorecard(0.99, MANIFEST))
    assert ok and state.version == 2  # a passing export does not stand in the way


def int8_block(passed: bool) -> dict:
    """export.json's int8 block of a graph that agreed with fp32 on 97% of 1000 images."""
    return {"file": "model.int8.onnx", "sha256": "a" * 64, "bytes": 100, "quant_format": "QDQ",
            "per_channel": True, "weights": "int8", "activations": "uint8",
            "calibration": {"split": "valid", "images": 128, "method": "minmax"},
            "gate": {"images": 1000, "top1_agreement": 0.97, "fp32_top1": 0.9,
                     "int8_top1": 0.88, "top1_delta": -0.02, "int8_images_per_second": 9.0,
                     "min_agreement": 0.99, "max_top1_drop": 0.005, "passed": passed,
                     "split": "test"},
            "threads": 2, "int8_images_per_second": 9.0, "fp32_images_per_second": 3.0}


def test_a_version_whose_int8_failed_its_gate_is_promoted_on_fp32_and_says_so(
        local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.99))
    record = {**json.loads(fixture_bytes("export.json")), "int8": int8_block(False)}
    registry.attach(1, "export.json", json.dumps(record).encode())
    ok, reasons, state = promote(registry, 1, scorecard=Scorecard(0.99, MANIFEST))
    assert ok and state.version == 1 and registry.alias().version == 1
    assert reasons[-1] == ("its int8 export failed its gate (see export.json): promoted on "
                           "fp32, served by fp32 ONNX on a CPU")
    assert reasons[-1] in json.dumps(registry.history()[-1])  # the audit trail says so too


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


def test_a_released_student_leaves_a_newer_version_behind_the_alias(
        local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    for seed in (1, 2, 3):
        registry.register(weights(seed), card(0.97))
    registry.set_alias("production", 2, reason="first")
    assert not promote_released_student(registry, 1, "production", ["passes"])
    assert promote_released_student(registry, 2, "production", ["passes"])
    assert registry.alias().version == 2 and len(registry.history()) == 1
    assert promote_released_student(registry, 3, "production", ["passes"])
    assert registry.alias().version == 3
    assert registry.history()[-1]["reason"] == "student gate: passes"


# --------------------------------------------------------------------------------------------
# Judging: the champion's score on the candidate's test manifest


def test_champion_on_the_same_manifest_is_read_from_its_card(
        registered_run: RegisteredRun) -> None:
    from flowerml.data.manifest import resolve_dataset

    store, cache, registry, metrics = registered_run
    published = resolve_dataset(store, "flowers102")
    score = champion_scorecard(registry, published, alias="production", cache_dir=cache,
                               device="cpu")
    assert (score.top1, score.version) == (metrics["top1"], 1)


def test_champion_on_another_manifest_is_re_evaluated(registered_run: RegisteredRun,
                                                     monkeypatch) -> None:
    import flowerml.evaluation.inference as inference
    from flowerml.data.manifest import resolve_dataset

    store, cache, registry, metrics = registered_run
    published = resolve_dataset(store, "flowers102")
    calls: list[str] = []
    original = inference.evaluate_model

    def counting(*args, **kwargs):
        calls.append("evaluated")
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "evaluate_model", counting)
    moved = elsewhere(published)
    score = champion_scorecard(registry, moved, alias="production", cache_dir=cache,
                               device="cpu", workers=0)  # no DataLoader worker processes
    assert calls == ["evaluated"]
    assert score.test_manifest_sha256 == "0" * 64 and score.version == 1
    assert score.top1 == pytest.approx(metrics["top1"])  # same weights, same test images


def test_no_production_model_means_no_champion(registered_run: RegisteredRun) -> None:
    from flowerml.data.manifest import resolve_dataset

    store, cache, _, _ = registered_run
    published = resolve_dataset(store, "flowers102")
    assert champion_scorecard(Registry(store, "tulips"), published, alias="production",
                              cache_dir=cache) is None


def test_promote_compares_the_stored_predictions_of_both_versions(
        local_store: LocalStore) -> None:
    from tests.helpers.paired import paired_outcomes, register_with_predictions

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
    from flowerml.registry.comparison import Comparison
    from flowerml.registry.promotion import judge_candidate

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
    from flowerml.data.manifest import resolve_dataset
    from flowerml.registry.promotion import measure_champion

    store, cache, registry, metrics = registered_run
    moved = elsewhere(resolve_dataset(store, "flowers102"))
    champion = measure_champion(registry, moved, alias="production", cache_dir=cache,
                                device="cpu", workers=0)
    assert champion.label == "flowers102:000001"
    predictions = champion.predictions
    assert predictions.manifest_sha256 == "0" * 64  # measured there, not read from the card
    assert len(predictions.images) == metrics["n"]
    assert top1_of(predictions.images) == pytest.approx(champion.scorecard.top1)
    assert predictions.weights_sha256 == registry.get(1).weights_sha256


def elsewhere(published: PublishedDataset) -> PublishedDataset:
    """The same images under another test-split identity: data the champion was not measured
    on (another dataset version's test split, as far as the gate can tell)."""
    class Elsewhere(PublishedDataset):
        def split_sha256(self, split: str) -> str:
            return "0" * 64

    return Elsewhere(**{f.name: getattr(published, f.name) for f in fields(published)})
