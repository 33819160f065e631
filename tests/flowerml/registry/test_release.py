"""Releasing runs: the card (built and rendered) and registration with the report."""

from __future__ import annotations

from flowerml.data.manifest import resolve_dataset
from flowerml.registry.release import render_card
from tests.helpers.synthetic import RegisteredRun


def test_card_records_lineage_and_software(registered_run: RegisteredRun) -> None:
    store, _, registry, metrics = registered_run
    card = registry.get(1).card
    published = resolve_dataset(store, "flowers102")
    assert card["metrics"] == metrics and card["arch"] == "resnet18"
    assert card["test_manifest_sha256"] == published.split_sha256("test")
    assert card["lineage"]["run_id"] == "tiny"
    assert card["lineage"]["dataset_version"] == published.version
    assert card["software"]["torch"] and "git_commit" in card["software"]
    assert len(card["classes"]) == 4 and card["normalisation"]["mean"][0] == 0.485
    keys = {info.key.rsplit("/", 1)[-1] for info in store.list("registry/flowers102/versions/")}
    assert {"report.md", "confusion.png", "card.md", "COMMITTED"} <= keys


def test_card_md_is_rendered_from_the_full_card(registered_run: RegisteredRun) -> None:
    store, _, _, metrics = registered_run
    text = store.get_bytes("registry/flowers102/versions/000001/card.md").decode()
    assert text.startswith("# flowers102 v000001\n")
    assert f"| top1 | {metrics['top1']:.6g} |" in text and "## Lineage" in text
    assert "[report.md](report.md)" in text


def test_render_card_escapes_and_lists() -> None:
    text = render_card({"model": "m", "version": 2, "notes": "a|b", "tags": ["x", 1]})
    assert "| notes | a\\|b |" in text and "- x" in text and "- 1" in text


def test_card_and_report_of_synthetic_data_say_so(registered_run: RegisteredRun) -> None:
    store, _, registry, _ = registered_run
    assert registry.get(1).card["synthetic_data"] is True  # trained on flowerml synth data
    folder = "registry/flowers102/versions/000001"
    card = store.get_bytes(f"{folder}/card.md").decode()
    assert card.split("\n\n")[1].startswith("> **Synthetic data.**")
    report = store.get_bytes(f"{folder}/report.md").decode()
    assert report.split("\n\n")[1].startswith("> **Synthetic data.**")


def test_card_of_real_data_has_no_synthetic_notice() -> None:
    text = render_card({"model": "m", "version": 1, "synthetic_data": False})
    assert "Synthetic" not in text and "| synthetic_data | false |" in text
