"""`flowerml compare A B`: two versions (or runs) paired on the same test images, from their
stored predictions; and its refusals, each one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.paired import register_with_predictions
from tests.helpers.registry_entries import MODEL, card, weights
from tests.helpers.synthetic import TINY_RUN, RegisteredRun

# The hand-built pair of test_comparison: b (v2) wins 2 images, loses 1, agrees on 4 of 8.
A = [(1, 1), (1, 1), (2, 2), (2, 3), (3, 4), (3, 1), (4, 1), (4, 4)]
B = [(1, 1), (1, 2), (2, 2), (2, 2), (3, 4), (3, 2), (4, 4), (4, 4)]


@pytest.fixture
def versions(local_store: LocalStore) -> LocalStore:
    """v1 and v2 on one manifest, v3 on another, v4 registered before predictions were kept."""
    registry = Registry(local_store, MODEL)
    register_with_predictions(registry, 1, A)
    register_with_predictions(registry, 2, B)
    register_with_predictions(registry, 3, B, manifest="b" * 64)
    registry.register(weights(4), {**card(0.5), "lineage": {"run_id": "old-run"}})
    return local_store


def keys(store: LocalStore) -> set[str]:
    return {info.key for info in store.list("")}


def test_two_versions_in_words(versions: LocalStore) -> None:
    result = invoke("compare", "flowers102:1", "flowers102:2", store=versions)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "flowers102:000002 vs flowers102:000001 on flowers102@abc test (8 images)",
        "  top-1: 0.5000 -> 0.6250 (+0.1250)",
        "  agreement: 50.00% (the same label on 4 images)",
        "  discordant: 2 right only with flowers102:000002, 1 right only with flowers102:000001",
        # 2 wins against 1 loss: P(X <= 2) = 7/8, P(X >= 2) = 4/8 for X ~ Binomial(3, 1/2).
        "  McNemar exact test: p = 1 (two-sided); flowers102:000002 worse: p = 0.875, better: "
        "p = 0.5",
        "  per-class accuracy: 3 of 4 classes changed (all):",
        "    1 pink primrose: 1.0000 -> 0.5000 (-0.5000, 2 images)",
        "    2 hard-leaved pocket orchid: 0.5000 -> 1.0000 (+0.5000, 2 images)",
        "    4 sweet pea: 0.5000 -> 1.0000 (+0.5000, 2 images)"]


def test_json_holds_the_whole_comparison(versions: LocalStore) -> None:
    result = invoke("compare", "flowers102:2", "flowers102:1", "--json", store=versions)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert (value["a"], value["b"], value["n"]) == ("flowers102:000002", "flowers102:000001", 8)
    assert (value["a_only"], value["b_only"], value["agree"]) == (2, 1, 4)
    assert value["p_b_worse"] == pytest.approx(0.5) and value["mcnemar_p"] == pytest.approx(1)
    assert [c["delta"] for c in value["per_class"]] == [0.5, -0.5, 0.0, -0.5]


def test_a_run_against_the_version_it_became(registered_run: RegisteredRun) -> None:
    store = registered_run.store
    before = keys(store)
    result = invoke("compare", "flowers102@production", f"run:{TINY_RUN}", "--json",
                    store=store)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert (value["a"], value["b"]) == ("flowers102:000001", f"run:{TINY_RUN}")
    assert value["n"] == registered_run.metrics["n"]
    assert (value["agreement"], value["discordant"], value["mcnemar_p"]) == (1.0, 0, 1.0)
    assert keys(store) == before  # comparing reads; it writes nothing


def test_different_manifests_are_refused_naming_both(versions: LocalStore) -> None:
    before = keys(versions)
    result = invoke("compare", "flowers102:1", "flowers102:3", store=versions)
    assert_refused(result, "flowers102:000001 was evaluated on flowers102@abc test (manifest "
                           "aaaaaaaaaaaa) and flowers102:000003 on flowers102@abc test (manifest "
                           "bbbbbbbbbbbb): a paired comparison needs the same images")
    as_json = invoke("compare", "flowers102:1", "flowers102:3", "--json", store=versions)
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout.splitlines()[-1])["kind"] == "refused"
    assert keys(versions) == before


def test_a_version_without_stored_predictions_says_how_to_fix(versions: LocalStore) -> None:
    result = invoke("compare", "flowers102:1", "flowers102:4", store=versions)
    assert_refused(result, "flowers102:000004 has no stored per-image predictions (evaluated "
                           "before evaluation kept them): evaluate its run again (flowerml "
                           "evaluate --run old-run) and compare run:old-run instead")
    as_json = invoke("compare", "flowers102:4", "flowers102:1", "--json", store=versions)
    assert json.loads(as_json.stdout.splitlines()[-1])["kind"] == "not-found"


@pytest.mark.parametrize(("a", "b", "message", "kind"), [
    ("flowers102:1", "flowers102:9", "flowers102 has no version 000009", "not-found"),
    ("tulips:1", "flowers102:1", "tulips has no version 000001", "not-found"),
    ("flowers102:1", "flowers102@staging", "flowers102 has no alias 'staging'", "not-found"),
    ("run:nope", "flowers102:1", "run 'nope' not found on", "not-found"),
    ("flowers102:1", "run:../x", "run id must be letters, digits", "bad-input"),
    ("Bad Name:1", "flowers102:1", "model name must be 1-63 lowercase letters", "bad-input"),
    ("flowers102:0", "flowers102:1", "version must be a number from 1 to 999999",
     "bad-input"),
])
def test_unknown_and_malformed_references(versions: LocalStore, a: str, b: str, message: str,
                                          kind: str) -> None:
    before = keys(versions)
    assert_refused(invoke("compare", a, b, store=versions), message)
    as_json = invoke("compare", a, b, "--json", store=versions)
    assert json.loads(as_json.stdout.splitlines()[-1])["kind"] == kind
    assert keys(versions) == before


def test_help_names_the_reference_forms() -> None:
    result = invoke("compare", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for form in ("NAME:VERSION", "NAME@ALIAS", "run:ID", "McNemar", "different test manifests"):
        assert form in text, form
