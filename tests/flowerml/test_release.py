"""Releasing runs: the card, registration with the report, and the champion's fair score."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from flowerml.data import resolve_dataset
from flowerml.inference import evaluate_run
from flowerml.ingest import FetchOptions, ingest
from flowerml.recipes import build_config
from flowerml.registry import Registry
from flowerml.release import build_card, champion_scorecard, register_run
from flowerml.storage import LocalStore
from flowerml.training import fit


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory):
    """A trained, evaluated run 'r' registered as flowers102:1 and promoted."""
    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    root = tmp_path_factory.mktemp("release")
    write_synthetic_archive(root / "src", SyntheticSpec(classes=4, per_class=8, image_size=48))
    store = LocalStore(root / "store")
    ingest(str(root / "src"), store, "flowers102", root / "cache", FetchOptions())
    fit(build_config("demo", epochs=1, image_size=40, batch_size=8), store=store,
        dataset="flowers102", run_id="r", cache_dir=root / "cache", device="cpu", workers=0)
    metrics = evaluate_run(store, "r", cache_dir=root / "cache", device="cpu",
                           workers=0).metrics.summary()
    registry = Registry(store, "flowers102")
    card = build_card(store, "r", metrics, promote=True, reasons=["test"],
                      gate={"threshold": 0.0, "tolerance": 0.0, "force": True})
    version = register_run(registry, store, "r", card)
    registry.set_alias("production", version.version, reason="test", forced=True)
    return store, root / "cache", registry, metrics


def test_card_records_lineage_and_software(released) -> None:
    store, _, registry, metrics = released
    card = registry.get(1).card
    published = resolve_dataset(store, "flowers102")
    assert card["metrics"] == metrics and card["arch"] == "resnet18"
    assert card["test_manifest_sha256"] == published.manifest_sha256
    assert card["lineage"]["run_id"] == "r"
    assert card["lineage"]["dataset_version"] == published.version
    assert card["software"]["torch"] and "git_commit" in card["software"]
    assert len(card["classes"]) == 4 and card["normalisation"]["mean"][0] == 0.485
    keys = {info.key.rsplit("/", 1)[-1] for info in store.list("registry/flowers102/versions/")}
    assert {"report.md", "confusion.png", "card.md", "COMMITTED"} <= keys


def test_champion_on_the_same_manifest_is_read_from_its_card(released) -> None:
    store, cache, registry, metrics = released
    published = resolve_dataset(store, "flowers102")
    score = champion_scorecard(registry, store, published, alias="production", cache_dir=cache,
                               device="cpu")
    assert (score.top1, score.version) == (metrics["top1"], 1)


def test_champion_on_another_manifest_is_re_evaluated(released, monkeypatch) -> None:
    store, cache, registry, metrics = released
    published = resolve_dataset(store, "flowers102")
    calls: list[str] = []
    import flowerml.release as release

    original = release.evaluate_model

    def counting(*args, **kwargs):
        calls.append("evaluated")
        return original(*args, **kwargs)

    monkeypatch.setattr(release, "evaluate_model", counting)
    moved = replace(published, manifest_sha256="0" * 64)
    score = champion_scorecard(registry, store, moved, alias="production", cache_dir=cache,
                               device="cpu")
    assert calls == ["evaluated"]
    assert score.test_manifest_sha256 == "0" * 64 and score.version == 1
    assert score.top1 == pytest.approx(metrics["top1"])  # same weights, same test images


def test_no_production_model_means_no_champion(released, tmp_path: Path) -> None:
    store, cache, _, _ = released
    published = resolve_dataset(store, "flowers102")
    assert champion_scorecard(Registry(store, "tulips"), store, published, alias="production",
                              cache_dir=cache) is None
