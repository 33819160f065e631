"""Registries the tests build: copies of the session's registered tiny run (as they are, or
exported to ONNX), a registry of two versions on the small published dataset, and exports that
take a graph already exported instead of running torch.onnx again."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from flowerml.data.manifest import PublishedDataset, resolve_dataset
from flowerml.io.storage_local import LocalStore
from flowerml.models.backbones import build_model
from flowerml.registry.versions import Registry
from flowerml.serving import export as export_module
from flowerml.serving.export import export_version
from tests.helpers.stores import copy_tree
from tests.helpers.synthetic import DATASET, SMALL_SPEC, RegisteredRun, SyntheticData


def registry_copy(registered_run: RegisteredRun, dest: Path) -> tuple[Registry, Path]:
    """The registered run's store and cache copied under `dest`: its registry and cache."""
    copy_tree(registered_run.store.root, dest / "store")
    copy_tree(registered_run.cache, dest / "cache")
    return Registry(LocalStore(dest / "store"), DATASET), dest / "cache"


class ExportedRegistry(NamedTuple):
    """A registry (flowers102:1, production, exported to ONNX) on its own store."""

    registry: Registry
    root: Path


def export_registry_copy(registered_run: RegisteredRun, root: Path) -> ExportedRegistry:
    """The registered tiny run's registry copied under `root` and exported to ONNX."""
    registry, cache = registry_copy(registered_run, root)
    assert export_version(registry, 1, cache_dir=cache, workers=0).passed
    return ExportedRegistry(registry, root)


def own_registry(exported: ExportedRegistry, dest: Path) -> Registry:
    """A test's own copy of the exported registry (a test may damage it)."""
    copy_tree(exported.root / "store", dest)
    return Registry(LocalStore(dest), DATASET)


def published_card(published: PublishedDataset, top1: float) -> dict:
    """The card of a 4-class ResNet-18 tested on `published` with test top-1 `top1`."""
    return {"arch": "resnet18", "image_size": 48,
            "classes": [{"label": i + 1, "name": n} for i, n in enumerate(published.class_names)],
            "metrics": {"top1": top1}, "test_manifest_sha256": published.split_sha256("test"),
            "lineage": {"dataset": published.dataset, "dataset_version": published.version}}


def two_version_registry(synthetic_data: SyntheticData, dest: Path) -> Registry:
    """A test's own registry holding two committed versions (test top-1 0.9 and 0.6) of a
    4-class model, on a store with the small dataset published (cache next to the store)."""
    def build(folder: Path) -> None:
        copy_tree(synthetic_data.published(SMALL_SPEC), folder)
        store = LocalStore(folder / "store")
        published = resolve_dataset(store, DATASET)
        entry = Registry(store, DATASET)
        for seed, top1 in ((1, 0.9), (2, 0.6)):
            entry.register(build_model("resnet18", 4, seed=seed).state_dict(),
                           published_card(published, top1))

    pristine = synthetic_data.once("registry-two-versions", build)
    store, _ = synthetic_data.copy(pristine, dest)
    return Registry(store, DATASET)


def export_writes(monkeypatch: pytest.MonkeyPatch, graph: bytes, exporter: str) -> None:
    """`export_version` takes `graph` (an export of the same weights made earlier, or a changed
    copy of one) as what torch.onnx wrote, without running it again (~2 CPU-s a time): for the
    tests whose point is what follows the export (parity, its fallback, refusals, int8)."""
    def write(model, image_size: int, path: Path, *args, **kwargs) -> str:
        Path(path).write_bytes(graph)
        return exporter

    monkeypatch.setattr(export_module, "export_onnx", write)
