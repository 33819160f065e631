"""Registries the tests build: copies of the session's registered tiny run (as they are, or
exported to ONNX), a registry of two versions on the small published dataset, exports that
take a graph already exported instead of running torch.onnx again, and ONNX graphs (and their
int8 quantisations) made once a session for the same weights and inputs, shared by every xdist
worker."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    """The registered tiny run's registry copied under `root` (a folder of the session's
    temporary tree) and exported to ONNX, its graph made once a session (`made_once`)."""
    registry, cache = registry_copy(registered_run, root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        made_once(monkeypatch, session_folder(root.parent))
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


# --------------------------------------------------------------------------------------------
# Graphs made once a session: torch.onnx costs ~2 CPU-s a graph (~4 for a process's first), and
# ONNX Runtime's static quantisation ~0.7; the same weights, normalisation and input size give
# the same graph wherever a test exports them.

_export_onnx = export_module.export_onnx
_quantize_int8 = export_module.quantize_int8


def session_folder(basetemp: Path) -> Path:
    """The folder of graphs made once, shared by every xdist worker of this session (beside
    `synthetic_data`'s: in the parent of a worker's base temporary folder)."""
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    folder = shared / "onnx-graphs"
    folder.mkdir(exist_ok=True)
    return folder


def graph_key(model, image_size: int, opset: int, preprocessing) -> str:
    """What the exported graph depends on: the module's structure and every tensor of it
    behind its normalisation (weights, buffers, mean and std), the example's size, the opset."""
    digest = hashlib.sha256(repr((str(model), image_size, opset)).encode())
    wrapped = export_module.PixelsToLogits(model, preprocessing)
    for name, tensor in wrapped.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def made_once(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """`export_version` (and anything else that calls flowerml.serving.export's export_onnx or
    quantize_int8) takes the graph made for the same inputs earlier this session, from
    `folder`: each is made (and checked) once by the real torch.onnx and ONNX Runtime. For the
    tests whose point is what follows an export, not the export itself."""
    exports_made_once(monkeypatch, folder)
    int8_made_once(monkeypatch, folder)


def exports_made_once(monkeypatch: pytest.MonkeyPatch, folder: Path, *,
                      fresh: bool = False) -> None:
    """flowerml.serving.export's export_onnx takes the graph of the same inputs made earlier
    this session (`fresh`: runs torch.onnx all the same, and leaves its graph for the others
    when none was made yet: for the tests whose point is the export)."""
    def export_onnx(model, image_size: int, path: Path,
                    opset: int = export_module.DEFAULT_OPSET, preprocessing=None) -> str:
        key = graph_key(model, image_size, opset, preprocessing)

        made = _export_onnx(model, image_size, path, opset, preprocessing) if fresh else None

        def make(built: Path) -> None:
            graph = built / "model.onnx"
            if made is None:
                exporter = _export_onnx(model, image_size, graph, opset, preprocessing)
            else:
                exporter = made
                graph.write_bytes(Path(path).read_bytes())
            (built / "exporter").write_text(exporter)

        built = SyntheticData(folder).once(f"graph-{key}", make)
        if made is not None:
            return made
        Path(path).write_bytes((built / "model.onnx").read_bytes())
        return (built / "exporter").read_text()

    monkeypatch.setattr(export_module, "export_onnx", export_onnx)


def int8_made_once(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """flowerml.serving.export's quantize_int8 takes the int8 graph of the same fp32 graph and
    calibration images made earlier this session."""
    def quantize_int8(fp32: bytes, calibration) -> tuple[bytes, int]:
        batches = [np.ascontiguousarray(batch, dtype=np.uint8) for batch in calibration]
        digest = hashlib.sha256(fp32)
        for batch in batches:
            digest.update(repr(batch.shape).encode())
            digest.update(batch.tobytes())
        key = digest.hexdigest()[:32]

        def make(built: Path) -> None:
            data, calibrated = _quantize_int8(fp32, batches)
            (built / "model.int8.onnx").write_bytes(data)
            (built / "calibrated").write_text(str(calibrated))

        built = SyntheticData(folder).once(f"int8-{key}", make)
        return (built / "model.int8.onnx").read_bytes(), int((built / "calibrated").read_text())

    monkeypatch.setattr(export_module, "quantize_int8", quantize_int8)
