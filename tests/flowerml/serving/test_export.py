"""ONNX export of a registry version: the file, its record, parity, and its checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch

from flowerml.io.storage_local import LocalStore
from flowerml.models.backbones import build_model
from flowerml.registry.export_record import (
    EXPORT_JSON,
    ONNX_FILE,
    DamagedExportRecord,
    ExportError,
    load_onnx_bytes,
    read_export,
)
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import Registry
from flowerml.serving.export import (
    Parity,
    PixelsToLogits,
    build_onnx_session,
    export_version,
    measure_parity,
)
from tests.helpers.registries import registry_copy
from tests.helpers.registry_entries import card, weights
from tests.helpers.stored_documents import fixture_bytes
from tests.helpers.synthetic import RegisteredRun


class Exported(NamedTuple):
    registry: Registry
    cache: Path
    record: dict


@pytest.fixture(scope="module")
def exported(registered_run: RegisteredRun,
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    registry, cache = registry_copy(registered_run, tmp_path_factory.mktemp("exported"))
    export = export_version(registry, 1, cache_dir=cache, workers=0)
    assert export.created
    return Exported(registry, cache, export.record)


def test_export_writes_a_checked_onnx_file_and_its_record(exported: Exported) -> None:
    data, record = load_onnx_bytes(exported.registry, 1)
    onnx.checker.check_model(onnx.load_from_string(data))
    assert record == exported.record
    assert record["exporter"] in {"dynamo", "torchscript"}
    assert record["bytes"] == len(data)
    assert record["input"]["dtype"] == "uint8"
    parity = record["parity"]
    assert parity["images"] == 24  # the tiny dataset's test split
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] < parity["logit_tolerance"]
    assert parity["onnx_images_per_second"] > 0 and parity["torch_images_per_second"] > 0


def test_the_onnx_graph_has_a_dynamic_batch_and_matches_eager(exported: Exported,
                                                             registered_run) -> None:
    from flowerml.registry.release import load_version

    data, record = load_onnx_bytes(exported.registry, 1)
    session = build_onnx_session(data)
    model = PixelsToLogits(load_version(exported.registry, 1, device="cpu").model).eval()
    size = record["input"]["size"][0]
    for batch in (1, 5):
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        actual = session.run(None, {"images": pixels.numpy()})[0]
        with torch.no_grad():
            expected = model(pixels).numpy()
        assert actual.shape == (batch, 4)
        np.testing.assert_allclose(actual, expected, atol=1e-3)


def test_exporting_again_returns_the_export_it_has(exported: Exported) -> None:
    again = export_version(exported.registry, 1, cache_dir=exported.cache, workers=0)
    assert not again.created
    assert again.record == exported.record


def test_a_tampered_onnx_file_is_refused(registered_run: RegisteredRun, tmp_path: Path,
                                         exported: Exported) -> None:
    registry, cache = registry_copy(registered_run, tmp_path)
    for name in (ONNX_FILE, EXPORT_JSON):
        registry.attach(1, name, exported.registry.read_attachment(1, name))
    onnx_path = registry.store.root / registry.attachment_key(1, ONNX_FILE)
    onnx_path.write_bytes(onnx_path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ExportError, match="model.onnx fails its checksum"):
        load_onnx_bytes(registry, 1)
    with pytest.raises(ExportError, match="fails its checksum"):
        export_version(registry, 1, cache_dir=cache, workers=0)


def test_an_uncommitted_version_is_not_exported(registered_run: RegisteredRun,
                                                tmp_path: Path) -> None:
    registry, cache = registry_copy(registered_run, tmp_path)
    (registry.store.root / registry.attachment_key(1, "COMMITTED")).unlink()
    with pytest.raises(RegistryError, match="not COMMITTED"):
        export_version(registry, 1, cache_dir=cache, workers=0)
    assert registry.read_attachment(1, ONNX_FILE) is None


def test_a_version_without_an_export_says_how_to_make_one(registered_run: RegisteredRun) -> None:
    with pytest.raises(ExportError, match="has no ONNX export .run: flowerml export"):
        load_onnx_bytes(registered_run.registry, 1)


def test_parity_fails_when_the_runtimes_disagree(exported: Exported) -> None:
    data, record = load_onnx_bytes(exported.registry, 1)
    size = record["input"]["size"][0]
    torch.manual_seed(7)
    other = build_model("resnet18", 4).eval()  # different weights than the exported graph
    batches = [(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8), None)]
    parity = measure_parity(other, build_onnx_session(data), batches)
    assert parity.images == 8
    assert not parity.passed
    assert parity.max_abs_logit_diff > parity.logit_tolerance


def test_parity_needs_both_agreement_and_close_logits() -> None:
    def parity(agreement: float, diff: float, images: int = 1000) -> Parity:
        return Parity(images, agreement, diff, 1.0, 1.0)

    assert parity(1.0, 1e-5).passed
    assert not parity(0.998, 1e-5).passed
    assert not parity(1.0, 2e-3).passed
    assert not parity(1.0, 0.0, images=0).passed


def test_export_record_is_json_on_the_store(exported: Exported) -> None:
    raw = exported.registry.read_attachment(1, EXPORT_JSON)
    assert json.loads(raw)["sha256"] == exported.record["sha256"]


# --------------------------------------------------------------------------------------------
# The export.json document


def attached_export(store: LocalStore, change=None) -> Registry:
    """Version 1 of a registry with the fixture export.json (as written before its model),
    changed by `change`."""
    registry = Registry(store, "tulips")
    registry.register(weights(1), card(0.9))
    record = json.loads(fixture_bytes(EXPORT_JSON))
    if change:
        change(record)
    registry.attach(1, EXPORT_JSON, json.dumps(record, indent=2, sort_keys=True).encode())
    return registry


def test_export_json_written_before_its_model_reads_and_round_trips(local_store: LocalStore
                                                                    ) -> None:
    record = read_export(attached_export(local_store), 1)
    assert record == json.loads(fixture_bytes(EXPORT_JSON))
    assert json.dumps(record, indent=2, sort_keys=True).encode() == fixture_bytes(EXPORT_JSON)


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r["parity"].update(passed="yes"),
     "parity.passed: Input should be a valid boolean (got 'yes')"),
    (lambda r: r.pop("sha256"), "sha256: Field required"),
    (lambda r: r["input"].update(size=["48", 48]),
     "input.size.0: Input should be a valid integer (got '48')"),
])
def test_an_edited_export_json_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                                 change, field: str) -> None:
    registry = attached_export(local_store, change)
    with pytest.raises(DamagedExportRecord) as caught:
        read_export(registry, 1)
    assert str(caught.value) == (f"registry/tulips/versions/000001/{EXPORT_JSON}: field "
                                 f"{field}")
    assert isinstance(caught.value, ExportError)
