"""Releasing runs: the card (built and rendered) and registration with the report."""

from __future__ import annotations

from pathlib import Path

from flowerml.data.manifest import resolve_dataset
from flowerml.data.preprocessing import Preprocessing, default_preprocessing
from flowerml.io.storage_local import LocalStore
from flowerml.registry.release import load_version, render_card
from flowerml.registry.versions import CARD_FIELDS, Registry
from flowerml.serving.runtimes import load_scorer
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


def test_a_card_records_the_preprocessing_its_model_is_loaded_with(
        registered_run: RegisteredRun, tmp_path: Path) -> None:
    """The card says what pixels the model expects, and whoever loads the version (evaluate,
    predict, score, export) gets that; a card registered before the field reads as today's
    values."""
    _, _, registry, _ = registered_run
    registered = registry.get(1).card
    todays = default_preprocessing(40)  # the tiny run: no weights, 40 px
    assert registered["preprocessing"] == todays.to_json()
    assert registered["preprocessing"]["resize"] == 46  # round(40 * 256 / 224)
    assert load_version(registry, 1, device="cpu").preprocessing == todays

    own = Preprocessing(44, 40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        interpolation="bicubic")
    older = {k: v for k, v in registered.items() if k not in (*CARD_FIELDS, "preprocessing")}
    copy = Registry(LocalStore(tmp_path / "store"), "flowers102")
    weights = registry.load_weights(1)
    copy.register(weights, {**older, "preprocessing": own.to_json()}, render=render_card)
    copy.register(weights, older, render=render_card)
    assert copy.get(1).card["preprocessing"] == own.to_json()  # read back validated
    assert load_version(copy, 1, device="cpu").preprocessing == own
    assert load_version(copy, 2, device="cpu").preprocessing == todays
    assert load_scorer(copy, 1, "torch").preprocessing == own
    assert load_scorer(copy, 2, "torch").preprocessing == todays
