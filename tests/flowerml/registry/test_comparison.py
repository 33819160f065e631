"""flowerml.registry.comparison: two models image by image (counts, McNemar, per-class), the stored
reading the stored predictions back from runs and registry versions."""

from __future__ import annotations

import json
from math import comb

import pytest

from flowerml.data.manifest import resolve_dataset
from flowerml.evaluation.predictions import (
    ComparisonError,
    PredictionsMissing,
    run_predictions,
)
from flowerml.io.storage_local import LocalStore
from flowerml.registry.aliases import DamagedRegistryDocument
from flowerml.registry.comparison import (
    DifferentManifests,
    biggest_changes,
    compare,
    mcnemar_exact,
    resolve_predictions,
    version_predictions,
)
from flowerml.registry.names import RegistryNotFound
from flowerml.registry.versions import Registry
from flowerml.training.runs import RunNotFound
from tests.helpers.paired import (
    NAMES,
    paired_outcomes,
    prediction_set,
    register_with_predictions,
    top1_of,
)
from tests.helpers.registry_entries import MODEL, card, weights
from tests.helpers.synthetic import TINY_RUN, RegisteredRun

# Eight images, two per class.      a (baseline)   b
#   0  pink primrose (1)            right          right
#   1  pink primrose (1)            right          wrong (as 2)
#   2  pocket orchid (2)            right          right
#   3  pocket orchid (2)            wrong (as 3)   right
#   4  canterbury bells (3)         wrong (as 4)   wrong (as 4)   both wrong, same label
#   5  canterbury bells (3)         wrong (as 1)   wrong (as 2)   both wrong, different labels
#   6  sweet pea (4)                wrong (as 1)   right
#   7  sweet pea (4)                right          right
A = [(1, 1), (1, 1), (2, 2), (2, 3), (3, 4), (3, 1), (4, 1), (4, 4)]
B = [(1, 1), (1, 2), (2, 2), (2, 2), (3, 4), (3, 2), (4, 4), (4, 4)]


def test_counts_agreement_and_top1_by_hand() -> None:
    result = compare(prediction_set("a", A), prediction_set("b", B))
    assert (result.a, result.b, result.n) == ("a", "b", 8)
    assert (result.both_right, result.a_only, result.b_only, result.both_wrong) == (3, 1, 2, 2)
    assert result.agree == 4  # images 0, 2, 4 and 7 get the same label
    assert result.agreement == 0.5 and result.discordant == 3
    assert (result.a_top1, result.b_top1) == (4 / 8, 5 / 8)


def test_per_class_deltas_by_hand() -> None:
    result = compare(prediction_set("a", A), prediction_set("b", B))
    rows = [(c.label, c.name, c.support, c.a_accuracy, c.b_accuracy, c.delta)
            for c in result.per_class]
    assert rows == [(1, "pink primrose", 2, 1.0, 0.5, -0.5),
                    (2, "hard-leaved pocket orchid", 2, 0.5, 1.0, 0.5),
                    (3, "canterbury bells", 2, 0.0, 0.0, 0.0),
                    (4, "sweet pea", 2, 0.5, 1.0, 0.5)]
    # Largest change first, drops before gains when equally large; unchanged classes left out.
    assert [c.label for c in biggest_changes(result)] == [1, 2, 4]
    assert [c.label for c in biggest_changes(result, limit=2)] == [1, 2]


def test_mcnemar_exact_is_the_binomial_tail_by_hand() -> None:
    # 1 win against 9 losses: P(X <= 1) for X ~ Binomial(10, 1/2) = (1 + 10) / 1024.
    assert mcnemar_exact(1, 9, "less") == pytest.approx(11 / 1024)
    assert mcnemar_exact(1, 9, "two-sided") == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1, "greater") == pytest.approx(11 / 1024)
    assert mcnemar_exact(9, 1, "less") == pytest.approx(1 - 1 / 1024)
    assert mcnemar_exact(0, 0, "less") == 1.0  # no discordant pair: no evidence either way


def test_comparison_p_values_are_said_of_b() -> None:
    a, b = paired_outcomes(both_right=50, a_only=9, b_only=1)
    result = compare(prediction_set("a", a), prediction_set("b", b))
    tail = sum(comb(10, k) for k in (0, 1)) / 2**10
    assert result.p_b_worse == pytest.approx(tail)
    assert result.p_b_better == pytest.approx(1 - 1 / 1024)
    assert result.p_two_sided == pytest.approx(2 * tail)
    swapped = compare(prediction_set("b", b), prediction_set("a", a))
    assert swapped.p_b_better == pytest.approx(tail)


def test_json_round_trip_keeps_every_figure() -> None:
    result = compare(prediction_set("a", A), prediction_set("b", B))
    value = json.loads(json.dumps(result.to_json()))
    assert value["mcnemar_p"] == result.p_two_sided and value["agreement"] == 0.5
    assert value["per_class"][0] == {"label": 1, "name": "pink primrose", "support": 2,
                                     "a_accuracy": 1.0, "b_accuracy": 0.5, "delta": -0.5}
    assert type(result).from_json(value) == result


def test_different_manifests_are_refused_naming_both() -> None:
    a = prediction_set("flowers102:000001", A, manifest="1" * 64, dataset="flowers102@old")
    b = prediction_set("run:r2", B, manifest="2" * 64, dataset="flowers102@new")
    with pytest.raises(DifferentManifests) as refused:
        compare(a, b)
    message = str(refused.value)
    assert message.startswith("flowers102:000001 was evaluated on flowers102@old test (manifest "
                              "111111111111) and run:r2 on flowers102@new test (manifest "
                              "222222222222): a paired comparison needs the same images")
    assert "flowerml evaluate --run ID --dataset-version V" in message
    assert refused.value.kind == "refused"


def test_predictions_of_other_images_are_refused() -> None:
    with pytest.raises(ComparisonError, match="hold predictions for different images"):
        compare(prediction_set("a", A), prediction_set("b", B[:-1]))


# --------------------------------------------------------------------------------------------
# Reading them back: a run's evaluation, and the version it was registered as


def test_a_run_and_its_registered_version_hold_the_same_predictions(
        registered_run: RegisteredRun) -> None:
    store, _, registry, metrics = registered_run
    from_run = run_predictions(store, TINY_RUN)
    from_version = version_predictions(registry, 1)
    published = resolve_dataset(store, "flowers102")
    assert [row.key for row in from_run.images] == [e.key for e in published.split_files("test")]
    assert [row.label for row in from_run.images] == [e.label for e in
                                                      published.split_files("test")]
    assert from_version.images == from_run.images
    assert top1_of(from_run.images) == pytest.approx(metrics["top1"])
    assert (from_version.source, from_run.source) == ("flowers102:000001", f"run:{TINY_RUN}")
    assert from_version.manifest_sha256 == published.split_sha256("test")
    assert from_version.weights_sha256 == registry.get(1).weights_sha256
    assert from_version.class_names == published.class_names
    assert resolve_predictions(store, "flowers102@production").images == from_run.images
    same = compare(from_version, from_run)
    assert (same.agreement, same.discordant, same.p_two_sided) == (1.0, 0, 1.0)


def test_unknown_runs_and_versions(registered_run: RegisteredRun) -> None:
    store = registered_run.store
    with pytest.raises(RunNotFound, match="run 'nope' not found"):
        resolve_predictions(store, "run:nope")
    with pytest.raises(RegistryNotFound):
        resolve_predictions(store, "flowers102:7")
    with pytest.raises(RegistryNotFound, match="no alias 'staging'"):
        resolve_predictions(store, "flowers102@staging")


def test_a_version_registered_before_predictions_were_kept_says_how_to_fix(
        local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), {**card(0.9), "lineage": {"run_id": "old-run"}})
    with pytest.raises(PredictionsMissing) as missing:
        version_predictions(registry, 1)
    assert str(missing.value) == (
        "flowers102:000001 has no stored per-image predictions (evaluated before evaluation "
        "kept them): evaluate its run again (flowerml evaluate --run old-run) and compare "
        "run:old-run instead")
    assert missing.value.kind == "not-found"


def test_predictions_that_do_not_match_their_checksum_are_refused(
        local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    register_with_predictions(registry, 1, A)
    key = registry.attachment_key(1, "predictions.jsonl")
    local_store.put_bytes(key, local_store.get_bytes(key).replace(b'"top5":[1,', b'"top5":[2,',
                                                                  1))
    with pytest.raises(ComparisonError, match="predictions.jsonl: sha256 does not match the "
                                              "one metrics.json records"):
        version_predictions(registry, 1)


def test_hand_built_versions_read_back(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    register_with_predictions(registry, 1, A)
    register_with_predictions(registry, 2, B)
    result = compare(version_predictions(registry, 1), version_predictions(registry, 2))
    assert (result.a, result.b) == ("flowers102:000001", "flowers102:000002")
    assert (result.a_only, result.b_only) == (1, 2)
    assert [c.name for c in result.per_class] == list(NAMES)


def test_an_edited_metrics_json_of_a_version_is_one_line_naming_file_and_field(
        local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    register_with_predictions(registry, 1, A)
    key = registry.attachment_key(1, "metrics.json")
    metrics = json.loads(local_store.get_bytes(key))
    metrics["predictions"]["split"] = 3
    local_store.put_bytes(key, json.dumps(metrics).encode())
    with pytest.raises(DamagedRegistryDocument) as caught:
        version_predictions(registry, 1)
    assert str(caught.value) == (f"{local_store.root}/{key}: field predictions.split: Input "
                                 "should be a valid string (got 3)")
