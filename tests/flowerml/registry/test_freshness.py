"""flowerml.registry.freshness: a planned retrain against production's lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.data.add import add_images
from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage_local import LocalStore
from flowerml.registry.freshness import PlannedTraining, compare_with_production
from flowerml.registry.versions import Registry
from tests.helpers.additions import class_folders
from tests.helpers.registry_entries import MODEL, card, weights
from tests.helpers.synthetic import DATASET

CONFIG = {"arch": "resnet18", "epochs": 3, "lr": 0.01, "seed": 0}
PLANNED = PlannedTraining("flowers102", "000002", CONFIG, "0.9.0")


@pytest.fixture
def registry(local_store: LocalStore) -> Registry:
    """flowers102:1 in production, trained on flowers102@000002 with CONFIG by flowerml 0.9.0."""
    registry = Registry(local_store, MODEL)
    lineage = {"dataset": "flowers102", "dataset_version": "000002", "training_config": CONFIG}
    registry.register(weights(1), {**card(0.9), "lineage": lineage,
                                   "software": {"flowerml": "0.9.0"}})
    registry.set_alias("production", 1, reason="test")
    return registry


def test_the_same_data_config_and_software_is_up_to_date(registry: Registry) -> None:
    fresh = compare_with_production(registry, "production", PLANNED)
    assert (fresh.up_to_date, fresh.production, fresh.differences) == (
        True, "flowers102:000001", ())
    assert fresh.reason().startswith("up to date: flowers102:000001 was trained on this")


@pytest.mark.parametrize("change, difference", [
    ({"dataset_version": "000003"},
     "dataset flowers102@000003, production was trained on flowers102@000002"),
    ({"training_config": {**CONFIG, "epochs": 4, "mixup": 0.2}},
     "training config differs in epochs, mixup"),
    ({"flowerml_version": "0.10.0"}, "flowerml 0.10.0, production was trained with 0.9.0"),
])
def test_each_difference_is_named(registry: Registry, change: dict, difference: str) -> None:
    planned = PlannedTraining(**{**PLANNED.__dict__, **change})
    fresh = compare_with_production(registry, "production", planned)
    assert (fresh.up_to_date, fresh.differences) == (False, (difference,))
    assert fresh.reason() == f"training: {difference} (production is flowers102:000001)"


def test_no_production_model_means_training(local_store: LocalStore) -> None:
    fresh = compare_with_production(Registry(local_store, MODEL), "production", PLANNED)
    assert fresh.to_json() == {"up_to_date": False, "production": None,
                               "differences": ["flowers102 has no 'production' model yet"],
                               "new_images": None, "needed": None}
    assert fresh.reason() == "training: flowers102 has no 'production' model yet"


def test_a_card_without_lineage_is_not_up_to_date(local_store: LocalStore) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.9))  # registered by hand: no lineage, no software
    registry.set_alias("production", 1, reason="test")
    fresh = compare_with_production(registry, "production", PLANNED)
    assert not fresh.up_to_date
    assert fresh.differences[0] == ("dataset flowers102@000002, production was trained on "
                                    "data its card does not record")


@pytest.mark.parametrize("needed, waits", [(3, True), (2, False)])
def test_a_data_triggered_retrain_waits_for_enough_new_training_images(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        needed: int, waits: bool) -> None:
    added = add_images(local_store, DATASET, str(class_folders(tmp_path / "new", {"1": 2})),
                       tmp_path / "cache")
    registry = Registry(local_store, MODEL)
    lineage = {"dataset": DATASET, "dataset_version": local_published.version,
               "training_config": CONFIG}
    registry.register(weights(1), {**card(0.9), "lineage": lineage,
                                   "software": {"flowerml": "0.9.0"}})
    registry.set_alias("production", 1, reason="test")
    planned = PlannedTraining(DATASET, added.version, CONFIG, "0.9.0", min_new_images=needed)
    fresh = compare_with_production(registry, "production", planned)
    assert (fresh.up_to_date, fresh.new_images, fresh.needed) == (waits, 2, needed)
    if waits:
        assert fresh.reason() == ("up to date: 2 new training images since production "
                                  "flowers102:000001 was trained, 3 needed to retrain")
    else:
        assert fresh.reason().startswith(f"training: dataset {DATASET}@{added.version}")
