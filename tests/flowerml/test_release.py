"""Releasing runs: the card (built and rendered) and registration with the report."""

from __future__ import annotations

import pytest

from flowerml.inference import evaluate_run
from flowerml.ingest import FetchOptions, ingest
from flowerml.manifest import resolve_dataset
from flowerml.recipes import build_config
from flowerml.registry import Registry
from flowerml.release import build_card, register_run, render_card
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


def test_card_md_is_rendered_from_the_full_card(released) -> None:
    store, _, _, metrics = released
    text = store.get_bytes("registry/flowers102/versions/000001/card.md").decode()
    assert text.startswith("# flowers102 v000001\n")
    assert f"| top1 | {metrics['top1']:.6g} |" in text and "## Lineage" in text
    assert "[report.md](report.md)" in text


def test_render_card_escapes_and_lists() -> None:
    text = render_card({"model": "m", "version": 2, "notes": "a|b", "tags": ["x", 1]})
    assert "| notes | a\\|b |" in text and "- x" in text and "- 1" in text
