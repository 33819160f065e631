"""`flowerml registry ...` (flowerml/cli/registry.py) and `predict --model`, through the
library's CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result

from flowerml.data.manifest import resolve_dataset
from flowerml.io.storage_local import LocalStore
from flowerml.models.backbones import build_model
from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused
from tests.helpers.cli import invoke as cli_invoke
from tests.helpers.registries import published_card, two_version_registry
from tests.helpers.synthetic import SyntheticData


@pytest.fixture
def registry(synthetic_data: SyntheticData, tmp_path: Path) -> Registry:
    return two_version_registry(synthetic_data, tmp_path)


def invoke(entry: Registry, *args: str) -> Result:
    """`flowerml ARGS` on the registry's store and the cache beside it."""
    return cli_invoke(*args, store=entry.store, cache=entry.store.root.parent / "cache")


def test_promote_reject_force_history_rollback(registry: Registry) -> None:
    promoted = invoke(registry, "registry", "promote", "flowers102", "1", "--threshold", "0.5")
    assert promoted.exit_code == 0, promoted.output
    assert "no production model yet" in promoted.stdout
    worse = invoke(registry, "registry", "promote", "flowers102", "2", "--threshold", "0.5")
    assert worse.exit_code == 1 and "regression of 0.3000 beyond tolerance" in worse.stdout
    assert registry.alias().version == 1
    forced = invoke(registry, "registry", "promote", "flowers102", "2", "--force")
    assert forced.exit_code == 0 and registry.alias().version == 2
    history = json.loads(invoke(registry, "registry", "history", "flowers102", "--json").stdout)
    assert [(h["seq"], h["to"], h["forced"]) for h in history] == [(1, 1, False), (2, 2, True)]
    rolled = invoke(registry, "registry", "rollback", "flowers102")
    assert rolled.exit_code == 0 and registry.alias().version == 1
    shown = json.loads(invoke(registry, "registry", "show", "flowers102", "--json").stdout)
    assert shown["aliases"] == {"production": 1} and len(shown["versions"]) == 2
    listed = json.loads(invoke(registry, "registry", "list", "--json").stdout)
    assert listed == [{"model": "flowers102", "versions": 2, "production": 1}]


def test_threshold_outside_unit_interval(registry: Registry) -> None:
    assert_refused(invoke(registry, "registry", "promote", "flowers102", "1",
                          "--threshold", "1.5"), "--threshold must be between 0 and 1 (got 1.5)")
    assert_refused(invoke(registry, "registry", "promote", "flowers102", "1",
                          "--class-drop", "-0.1"), "--class-drop must be between 0 and 1 (got "
                                                   "-0.1)")
    assert registry.alias() is None and registry.history() == []


def test_unknown_model_and_alias(registry: Registry) -> None:
    for json_flag in ((), ("--json",)):  # the same one-line refusal with and without --json
        assert_refused(invoke(registry, "registry", "show", "tulips", *json_flag),
                       "model 'tulips' has no versions")
        assert_refused(invoke(registry, "registry", "history", "tulips", *json_flag),
                       "model 'tulips' has no versions")
        assert_refused(invoke(registry, "registry", "history", "flowers102", "--alias",
                              "staging", *json_flag), "flowers102 has no alias 'staging'")
        assert_refused(invoke(registry, "registry", "rollback", "tulips", *json_flag),
                       "model 'tulips' has no versions")
        assert_refused(invoke(registry, "registry", "rollback", "flowers102", *json_flag),
                       "flowers102 has no alias 'production'")
    assert_refused(invoke(registry, "registry", "promote", "tulips", "1"),
                   "model 'tulips' has no versions")
    assert_refused(invoke(registry, "registry", "promote", "flowers102", "9"), "000009")
    image = next(Path(registry.store.root.parent / "cache").rglob("*.jpg"))
    assert_refused(invoke(registry, "predict", str(image), "--model", "flowers102@staging"),
                   "staging")


def test_rollback_with_no_previous_version(registry: Registry) -> None:
    invoke(registry, "registry", "promote", "flowers102", "1", "--threshold", "0.5")
    assert_refused(invoke(registry, "registry", "rollback", "flowers102"),
                   "no previous version to roll back to")
    assert registry.alias().version == 1


def test_version_not_committed_cannot_be_promoted(registry: Registry,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    published = resolve_dataset(registry.store, "flowers102")
    weights = build_model("resnet18", 4, seed=3).state_dict()

    def crash(version: int, sha: str) -> None:  # a registration killed just before COMMITTED
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(registry, "_commit", crash)
    with pytest.raises(RuntimeError):
        registry.register(weights, published_card(published, 0.99))
    assert_refused(invoke(registry, "registry", "promote", "flowers102", "3", "--force"),
                   "version 000003 is not COMMITTED")
    assert registry.alias() is None


def test_tampered_weights_refused_on_promote_and_load(registry: Registry) -> None:
    invoke(registry, "registry", "promote", "flowers102", "1", "--threshold", "0.5")
    key = "registry/flowers102/versions/000002/model.safetensors"
    data = registry.store.get_bytes(key)
    registry.store.put_bytes(key, data[:-1] + bytes([data[-1] ^ 1]))
    assert_refused(invoke(registry, "registry", "promote", "flowers102", "2", "--force"),
                   "checksum")
    image = next(Path(registry.store.root.parent / "cache").rglob("*.jpg"))
    assert_refused(invoke(registry, "predict", str(image), "--model", "flowers102:2"), "checksum")
    assert registry.alias().version == 1 and len(registry.history()) == 1


def test_predict_with_the_production_model(registry: Registry) -> None:
    invoke(registry, "registry", "promote", "flowers102", "1", "--threshold", "0.5")
    image = next(Path(registry.store.root.parent / "cache").rglob("*.jpg"))
    result = invoke(registry, "predict", str(image), "--device", "cpu", "--top-k", "2", "--json")
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in result.stdout.splitlines()]  # one JSON line per image
    assert row["image"] == str(image)
    predictions = row["predictions"]
    assert len(predictions) == 2 and predictions[0]["name"] in {
        "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"}


def test_an_empty_store_lists_nothing(tmp_path: Path) -> None:
    empty = Registry(LocalStore(tmp_path / "store"), "flowers102")
    listed = invoke(empty, "registry", "list")
    assert listed.exit_code == 0 and listed.stdout == "", listed.output
    listed = invoke(empty, "registry", "list", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == [], listed.output
    assert_refused(invoke(empty, "registry", "show", "flowers102"),
                   "model 'flowers102' has no versions")
    assert_refused(invoke(empty, "registry", "history", "flowers102", "--json"),
                   "model 'flowers102' has no versions")
    assert "prints nothing" in invoke(empty, "registry", "list", "--help").stdout


def test_rollback_walks_back_and_history_shows_padded_versions(registry: Registry) -> None:
    published = resolve_dataset(registry.store, "flowers102")
    registry.register(build_model("resnet18", 4, seed=3).state_dict(), published_card(published, 0.95))
    first = json.loads(invoke(registry, "registry", "promote", "flowers102", "2",
                              "--threshold", "0.5", "--json").stdout)
    assert first == {"model": "flowers102", "alias": "production", "version": 2,
                     "previous": None, "promoted": True, "reasons": first["reasons"]}
    assert "no production model yet" in first["reasons"][1]
    second = invoke(registry, "registry", "promote", "flowers102", "3", "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["previous"] == 2
    below = invoke(registry, "registry", "promote", "flowers102", "1", "--threshold", "0.99",
                   "--json")
    assert below.exit_code == 1  # the gate refuses: exit 1, as without --json
    refused = json.loads(below.stdout)
    assert (refused["promoted"], refused["version"], refused["previous"]) == (False, 1, 3)
    assert any("< threshold 0.9900" in r for r in refused["reasons"])
    forced = invoke(registry, "registry", "promote", "flowers102", "1", "--force", "--json")
    assert json.loads(forced.stdout)["promoted"] is True and registry.alias().version == 1

    rolled = invoke(registry, "registry", "rollback", "flowers102", "--json")
    assert rolled.exit_code == 0, rolled.output
    assert {k: v for k, v in json.loads(rolled.stdout).items() if k != "reasons"} == {
        "model": "flowers102", "alias": "production", "version": 3, "previous": 1,
        "promoted": True}
    rolled = invoke(registry, "registry", "rollback", "flowers102")
    assert rolled.exit_code == 0, rolled.output
    assert rolled.stdout == "flowers102@production -> 000002 (was 000003)\n"
    assert_refused(invoke(registry, "registry", "rollback", "flowers102"),
                   "no previous version to roll back to")
    assert registry.alias().version == 2  # never forward again to the forced version 1

    lines = invoke(registry, "registry", "history", "flowers102").stdout.splitlines()
    assert [line.split(maxsplit=2)[2].split(": ")[0] for line in lines] == [
        "- -> 000002", "000002 -> 000003", "000003 -> 000001 (forced)",
        "000001 -> 000003 (rollback)", "000003 -> 000002 (rollback)"]
    history = json.loads(invoke(registry, "registry", "history", "flowers102", "--json").stdout)
    assert [h["rollback"] for h in history] == [False, False, False, True, True]
    listed = invoke(registry, "registry", "list")
    assert listed.stdout == "flowers102: 3 version(s), production 000002\n"


def test_show_prints_the_gates_paired_test_from_each_card(local_store: LocalStore) -> None:
    from flowerml.registry.comparison import compare
    from flowerml.registry.gates import Gate, PairedUnavailable, paired_figures
    from tests.helpers.paired import paired_outcomes, prediction_set
    from tests.helpers.registry_entries import card as bare_card
    from tests.helpers.registry_entries import weights

    champion, candidate = paired_outcomes(both_right=90, a_only=8, b_only=1, both_wrong=1)
    paired = compare(prediction_set("flowers102:000001", champion),
                     prediction_set("run:r2", candidate))
    missing = PairedUnavailable("flowers102:000001", "flowers102:000001 has no stored per-image "
                                                     "predictions")
    entry = Registry(local_store, "flowers102")
    for seed, figures in ((1, None), (2, paired_figures(paired, Gate(class_drop=0.05))),
                          (3, paired_figures(missing, Gate()))):
        entry.register(weights(seed), {**bare_card(0.9), "gate": {"paired": figures}})
    result = cli_invoke("registry", "show", "flowers102", store=local_store)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("000001: top-1 0.9000") and lines[1].startswith("000002")
    assert lines[2] == ("    vs flowers102:000001: McNemar 1 right only here, 8 right only "
                        "there (of 100), one-sided p = 0.01953: significantly worse")
    # 8 of the 9 lost images are of classes 1-4 in turn: two each, 25 images a class.
    assert lines[3].startswith("    classes more than 0.05 below it: 1 pink primrose 1.0000 -> "
                               "0.9200")
    assert lines[4:] == ["000003: top-1 0.9000, run None",
                         "    vs flowers102:000001: paired test not run (flowers102:000001 has "
                         "no stored per-image predictions)"]
    shown = json.loads(cli_invoke("registry", "show", "flowers102", "--json",
                                  store=local_store).stdout)
    assert [v["paired"] and v["paired"]["ran"] for v in shown["versions"]] == [None, True, False]
