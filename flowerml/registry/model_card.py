"""card.json, a registry version's model card: its document type (`ModelCard`).

The registry writes it (`Registry.register`: the caller's card plus `version`, `model`,
`weights_sha256` and `registered_at`) and reads it back validated; `flowerml.registry.release` builds the
caller's part of it (`build_card`: every field below) and a distilled student's card adds
`teacher`. A card registered directly through `Registry.register` (tests, older tools) may hold
only some of the release's fields, so those are optional here; any field a card holds must have
its type, and fields not declared (`teacher`, `run_id`, ...) are kept.
"""

from __future__ import annotations

from typing import Any

from flowerml.core.documents import Sha256, StoredDocument


class CardClass(StoredDocument):
    label: int
    name: str


class Normalisation(StoredDocument):
    mean: list[float]
    std: list[float]


class CardPreprocessing(StoredDocument):
    """The pixels the model expects (`flowerml.data.preprocessing.Preprocessing`): its
    weights' own resize, crop, filter, mean and std. A card without it (registered before the
    field existed, or for a model trained with `--weights none`'s values) reads as today's:
    short side round(S*256/224), centre S, bilinear, ImageNet mean and std."""

    resize: int
    crop: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"


class CardMetrics(StoredDocument):
    """The evaluation's metrics.json on the test split (`top1` is what the gates compare)."""

    top1: float | None = None
    top5: float | None = None
    loss: float | None = None


class Gate(StoredDocument):
    """The gate's decision at registration (its kind's own fields, e.g. threshold, kept)."""

    promote: bool | None = None
    reasons: list[str] | None = None


class Lineage(StoredDocument):
    dataset: str | None = None
    dataset_version: str | None = None
    manifest_sha256: Sha256 | None = None
    run_id: str | None = None
    training_config: dict[str, Any] | None = None
    best_valid_top1: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None


class CardFields(StoredDocument):
    """What `flowerml.registry.release.build_card` writes (all optional when read: see the module)."""

    arch: str | None = None
    synthetic_data: bool | None = None
    classes: list[CardClass] | None = None
    image_size: int | None = None
    normalisation: Normalisation | None = None
    preprocessing: CardPreprocessing | None = None
    metrics: CardMetrics | None = None
    test_manifest_sha256: Sha256 | None = None
    gate: Gate | None = None
    lineage: Lineage | None = None
    software: dict[str, str | None] | None = None
    device: str | None = None
    world_size: int | None = None
    wall_seconds: float | None = None


class ModelCard(CardFields):
    """`registry/<model>/versions/<NNNNNN>/card.json` as the registry stores it."""

    version: int
    model: str
    weights_sha256: Sha256
    registered_at: str
