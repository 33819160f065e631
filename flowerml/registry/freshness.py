"""Whether a retrain would only repeat the model in production: what it would train on and
with (dataset version, resolved training config, flowerml version) against the lineage that
production's card records. A match means "up to date": the run ends without training and
without a new version; any difference is named, so a person sees why a run trained. A retrain
started by new data (`min_new_images`) is also up to date until the dataset holds that many
training images production's dataset version does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from flowerml.core.errors import DatasetNotFound
from flowerml.data.manifest import resolve_dataset
from flowerml.io.storage import Store
from flowerml.registry.names import RegistryNotFound
from flowerml.registry.versions import Registry


@dataclass(frozen=True)
class PlannedTraining:
    """What a retrain is about to train: on which published version, with which config."""

    dataset: str
    dataset_version: str
    training_config: dict[str, Any]
    flowerml_version: str | None
    min_new_images: int | None = None


@dataclass(frozen=True)
class Freshness:
    """The verdict: `up_to_date` when production was trained on exactly this; `production`
    is its label (None: no production model), `differences` what would change."""

    up_to_date: bool
    production: str | None
    differences: tuple[str, ...]
    new_images: int | None = None  # training images production's data did not hold
    needed: int | None = None  # how many new ones a retrain waits for (None: any change)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "differences": list(self.differences)}

    def reason(self) -> str:
        """One line for a person: why the run trains, or why it need not."""
        if self.up_to_date and self.differences:
            return (f"up to date: {self.new_images} new training images since production "
                    f"{self.production} was trained, {self.needed} needed to retrain")
        if self.up_to_date:
            return (f"up to date: {self.production} was trained on this dataset version with "
                    "this training config and flowerml version; nothing to train "
                    "(force_train / --force-train trains anyway)")
        if self.production is None:
            return f"training: {self.differences[0]}"
        return f"training: {'; '.join(self.differences)} (production is {self.production})"


def installed_flowerml() -> str | None:
    """This install's flowerml version, as a card's `software.flowerml` records it."""
    try:
        return metadata.version("flowerml")
    except metadata.PackageNotFoundError:
        return None


def compare_with_production(registry: Registry, alias: str,
                            planned: PlannedTraining) -> Freshness:
    """`planned` against the lineage of the version `alias` points at."""
    try:
        production = registry.resolve(alias)
    except RegistryNotFound:
        return Freshness(False, None, (f"{registry.model} has no '{alias}' model yet",))
    card = production.card
    lineage = card.get("lineage") or {}
    trained_with = (card.get("software") or {}).get("flowerml")
    differences = []
    if (lineage.get("dataset"), lineage.get("dataset_version")) != (
            planned.dataset, planned.dataset_version):
        trained_on = (f"{lineage['dataset']}@{lineage.get('dataset_version')}"
                      if lineage.get("dataset") else "data its card does not record")
        differences.append(f"dataset {planned.dataset}@{planned.dataset_version}, production "
                           f"was trained on {trained_on}")
    changed = config_changes(lineage.get("training_config") or {}, planned.training_config)
    if changed:
        differences.append(f"training config differs in {', '.join(changed)}")
    if trained_with != planned.flowerml_version:
        differences.append(f"flowerml {planned.flowerml_version}, production was trained with "
                           f"{trained_with}")
    fresh = Freshness(not differences, production.label, tuple(differences))
    if differences and planned.min_new_images is not None:
        new = new_training_images(registry.store, planned.dataset, planned.dataset_version,
                                  lineage.get("dataset_version")
                                  if lineage.get("dataset") == planned.dataset else None)
        fresh = Freshness(new < planned.min_new_images, production.label, tuple(differences),
                          new, planned.min_new_images)
    return fresh


def new_training_images(store: Store, dataset: str, version: str,
                        baseline: str | None) -> int:
    """How many training images of `dataset@version` (by sha256) `baseline`'s splits lack
    (all of them when there is no baseline, or it is gone from the store)."""
    train = {entry.sha256 for entry in resolve_dataset(store, dataset, version)
             .split_files("train")}
    if baseline is None:
        return len(train)
    try:
        held = {entry.sha256 for entry in resolve_dataset(store, dataset, baseline).files}
    except DatasetNotFound:
        return len(train)
    return len(train - held)


def config_changes(recorded: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """The config fields whose values differ (a field only one side has counts as changed)."""
    return sorted(k for k in recorded.keys() | planned.keys() if recorded.get(k) != planned.get(k))
