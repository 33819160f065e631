"""ONNX export of a registry version: the file, its record, parity, and its checksum."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch

from flowerml.evaluation.predictions import ComparisonError
from flowerml.io.storage_local import LocalStore
from flowerml.models.backbones import build_model
from flowerml.registry.export_record import (
    EXPORT_JSON,
    ONNX_FILE,
    DamagedExportRecord,
    ExportError,
    load_int8_bytes,
    load_onnx_bytes,
    read_export,
)
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import Registry
from flowerml.serving import export as export_module
from flowerml.serving.export import (
    Parity,
    PixelsToLogits,
    build_onnx_session,
    export_version,
    measure_parity,
    parity_providers,
    parity_session,
)
from flowerml.serving.quantize import (
    Int8Gate,
    calibration_indices,
    measure_int8,
    sample_batches,
)
from tests.helpers.registries import (
    export_writes,
    exports_made_once,
    int8_made_once,
    made_once,
    registry_copy,
    session_folder,
)
from tests.helpers.registry_entries import card, weights
from tests.helpers.stored_documents import fixture_bytes
from tests.helpers.stores import copy_tree, replace_file
from tests.helpers.synthetic import RegisteredRun


class Exported(NamedTuple):
    registry: Registry
    cache: Path
    record: dict


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's graphs made once (tests/helpers/registries.py)."""
    return session_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(registered_run: RegisteredRun, graphs: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Version 1 exported by torch.onnx here (its graph then left for the other modules)."""
    registry, cache = registry_copy(registered_run, tmp_path_factory.mktemp("exported"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        exports_made_once(monkeypatch, graphs, fresh=True)
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
    # compared with the logits the evaluation kept: PyTorch did not run again
    assert (parity["reference"], parity["reference_note"]) == ("evaluation-logits", None)
    assert parity["torch_images_per_second"] is None and parity["onnx_images_per_second"] > 0
    assert (parity["provider"], parity["threads"]) == ("CPUExecutionProvider",
                                                       len(os.sched_getaffinity(0)))
    assert "int8" not in record or record["int8"] is None


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


# --------------------------------------------------------------------------------------------
# One PyTorch pass: the parity check against the evaluation's logits, and its fallback


def perturbed(data: bytes) -> bytes:
    """The graph with one weight changed: the classifier's matrix (its one 2-D initializer)
    scaled by 1.01, which moves every non-zero logit by 1% of itself."""
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    (tensor,) = [t for t in model.graph.initializer if len(t.dims) == 2]
    values = numpy_helper.to_array(tensor) * np.float32(1.01)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model.SerializeToString()


def test_a_graph_with_a_perturbed_weight_fails_fp32_parity(registered_run: RegisteredRun,
                                                            exported: Exported, tmp_path: Path,
                                                            monkeypatch) -> None:
    """The gate against the stored logits refuses a graph that is not the evaluated model:
    export.json records the failure, and the version cannot be promoted on it."""
    data, record = load_onnx_bytes(exported.registry, 1)
    export_writes(monkeypatch, perturbed(data), record["exporter"])
    registry, cache = registry_copy(registered_run, tmp_path)
    export = export_version(registry, 1, cache_dir=cache, workers=0)
    parity = export.record["parity"]
    assert not export.passed and not parity["passed"]
    assert parity["reference"] == "evaluation-logits"
    assert parity["max_abs_logit_diff"] > parity["logit_tolerance"]
    assert read_export(registry, 1)["parity"]["passed"] is False


def test_a_version_without_stored_logits_runs_pytorch_again(registered_run: RegisteredRun,
                                                            exported: Exported, tmp_path: Path,
                                                            monkeypatch) -> None:
    """A version evaluated before the logits were kept (no `logits` block in its metrics.json)
    gets today's two-pass check, and export.json says why."""
    data, record = load_onnx_bytes(exported.registry, 1)
    export_writes(monkeypatch, data, record["exporter"])
    registry, cache = registry_copy(registered_run, tmp_path)
    metrics_path = registry.store.root / registry.attachment_key(1, "metrics.json")
    metrics = json.loads(metrics_path.read_text())
    del metrics["predictions"]["logits"]
    replace_file(metrics_path, json.dumps(metrics).encode())
    (registry.store.root / registry.attachment_key(1, "logits.npy")).unlink()
    parity = export_version(registry, 1, cache_dir=cache, workers=0).record["parity"]
    assert parity["passed"] and parity["reference"] == "pytorch"
    assert parity["reference_note"] == ("its evaluation kept no logits (evaluated before they "
                                        "were kept)")
    assert parity["torch_images_per_second"] > 0


def test_tampered_stored_logits_are_refused(registered_run: RegisteredRun, exported: Exported,
                                            tmp_path: Path, monkeypatch) -> None:
    data, record = load_onnx_bytes(exported.registry, 1)
    export_writes(monkeypatch, data, record["exporter"])
    registry, cache = registry_copy(registered_run, tmp_path)
    path = registry.store.root / registry.attachment_key(1, "logits.npy")
    replace_file(path, path.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ComparisonError, match="logits.npy: sha256 does not match"):
        export_version(registry, 1, cache_dir=cache, workers=0)
    assert registry.read_attachment(1, EXPORT_JSON) is None


@pytest.mark.parametrize(("available", "cuda", "chosen"), [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True,
     ("CUDAExecutionProvider", "CPUExecutionProvider")),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], False, ("CPUExecutionProvider",)),
    (["AzureExecutionProvider", "CPUExecutionProvider"], True, ("CPUExecutionProvider",)),
])
def test_parity_runs_on_cuda_only_where_onnxruntime_gpu_and_a_gpu_are(available, cuda,
                                                                       chosen) -> None:
    assert parity_providers(available, cuda) == chosen


def test_the_cpu_parity_session_uses_every_core(exported: Exported) -> None:
    data, _ = load_onnx_bytes(exported.registry, 1)
    session = parity_session(data)
    assert session.get_providers()[0] == "CPUExecutionProvider"  # no GPU in the test suite
    assert session.get_session_options().intra_op_num_threads == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# int8 behind its own gate


@pytest.fixture(scope="module")
def exported_int8(registered_run: RegisteredRun, exported: Exported, graphs: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Version 1 exported with int8 in one go (its fp32 graph the module's `exported` one, its
    int8 graph quantised once a session)."""
    registry, cache = registry_copy(registered_run, tmp_path_factory.mktemp("exported-int8"))
    data, record = load_onnx_bytes(exported.registry, 1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        export_writes(monkeypatch, data, record["exporter"])
        int8_made_once(monkeypatch, graphs)
        export = export_version(registry, 1, cache_dir=cache, workers=0, quantize="int8")
    assert export.created and export.passed
    return Exported(registry, cache, export.record)


def test_int8_export_writes_its_graph_and_gate_figures(exported_int8: Exported) -> None:
    data, record = load_int8_bytes(exported_int8.registry, 1)
    int8 = record["int8"]
    assert record == exported_int8.record
    assert (int8["file"], int8["bytes"]) == ("model.int8.onnx", len(data))
    assert (int8["quant_format"], int8["per_channel"]) == ("QDQ", True)
    model = onnx.load_from_string(data)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    # calibrated on the tiny dataset's valid split (4 classes x 3 images: all of it)
    assert int8["calibration"] == {"split": "valid", "images": 12, "method": "minmax"}
    gate = int8["gate"]
    assert gate["images"] == 24
    assert gate["top1_delta"] == pytest.approx(gate["int8_top1"] - gate["fp32_top1"])
    assert gate["passed"] == (gate["top1_agreement"] >= 0.99 and gate["top1_delta"] >= -0.005)
    assert gate["fp32_top1"] == pytest.approx(exported_int8.registry.get(1).card["metrics"]
                                              ["top1"])
    assert int8["int8_images_per_second"] > 0 and int8["fp32_images_per_second"] > 0
    registry = exported_int8.registry
    card = registry.store.get_bytes(registry.attachment_key(1, "card.md")).decode()
    assert "int8_top1_agreement" in card and "model.int8.onnx" in card


def test_an_int8_model_calibrated_on_one_blank_image_fails_its_gate(
        exported_int8: Exported, graphs: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrated on a single all-zero image, every activation range is that image's: the
    int8 graph's top-1 parts from fp32's beyond what the gate allows. (A freshly initialised
    ResNet-18, whose fp32 top-1 varies over the test images: the tiny trained model answers
    one class for all of them, which any int8 graph agrees with.) Both graphs are made once a
    session (cli/test_export.py's failed int8 gate is the same pair); parity checks the fp32
    one against the eager model here."""
    made_once(monkeypatch, graphs)
    size = exported_int8.record["input"]["size"][0]
    path = tmp_path / "model.onnx"
    export_module.export_onnx(build_model("resnet18", 4, seed=3).eval(), size, path)
    fp32 = path.read_bytes()
    blank, calibrated = export_module.quantize_int8(fp32, [np.zeros((1, 3, size, size),
                                                                    np.uint8)])
    assert calibrated == 1
    batches = export_module.test_batches(exported_int8.registry.store,
                                         exported_int8.registry.get(1).card,
                                         exported_int8.cache, size, 0, 32)
    parity, scores = export_module.compare_runtimes(build_onnx_session(fp32), batches,
                                                    model=build_model("resnet18", 4, seed=3))
    assert parity.passed and len(set(scores.predicted.tolist())) > 1
    gate = measure_int8(build_onnx_session(blank), batches, scores.predicted, scores.labels)
    assert gate.images == 24
    assert gate.top1_agreement < gate.min_agreement or gate.top1_delta < -gate.max_top1_drop
    assert not gate.passed


def test_int8_gate_needs_both_agreement_and_top1() -> None:
    def gate(agreement: float, fp32: float, int8: float) -> Int8Gate:
        return Int8Gate(1000, agreement, fp32, int8, 1.0)

    assert gate(0.995, 0.90, 0.897).passed
    assert not gate(0.989, 0.90, 0.90).passed
    assert not gate(1.0, 0.90, 0.894).passed
    assert not Int8Gate(0, 1.0, 1.0, 1.0, 1.0).passed


def test_a_version_exported_without_int8_is_quantised_later(
        exported: Exported, graphs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """export.json is create-only: int8 made after the export lands in export.int8.json, which
    read_export shows as the record's int8 block; its gate compares with the fp32 graph run
    by ONNX Runtime on the test split. (The int8 graph of the same fp32 graph and calibration
    images is quantised once a session.)"""
    int8_made_once(monkeypatch, graphs)
    registry = Registry(LocalStore(copy_tree(exported.registry.store.root, tmp_path / "s")),
                        exported.registry.model)
    export = export_version(registry, 1, cache_dir=exported.cache, workers=0, quantize="int8")
    assert export.created and export.int8_passed is not None
    assert export.record["parity"] == exported.record["parity"]  # export.json as it was
    assert json.loads(registry.read_attachment(1, EXPORT_JSON)) == exported.record
    int8 = json.loads(registry.read_attachment(1, "export.int8.json"))
    assert read_export(registry, 1)["int8"] == int8 == export.record["int8"]
    assert int8["gate"]["images"] == 24 and int8["fp32_images_per_second"] > 0
    assert load_int8_bytes(registry, 1)[1]["int8"]["sha256"] == int8["sha256"]
    again = export_version(registry, 1, cache_dir=exported.cache, workers=0, quantize="int8")
    assert not again.created and again.record == export.record


def test_calibration_takes_evenly_spaced_images_of_the_split() -> None:
    assert calibration_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert calibration_indices(1020, 128).tolist()[:3] == [0, 8, 16]
    assert len(calibration_indices(1020, 128)) == 128
    assert calibration_indices(1020, 128)[-1] == 1019


def test_the_graph_and_its_contract_follow_the_cards_preprocessing(
        registered_run: RegisteredRun, tmp_path: Path) -> None:
    """A version whose card records its weights' own preprocessing: export.json's input
    contract says that resize and crop, the graph normalises with that mean and std, and the
    parity check reads the test split at that resize."""
    from flowerml.data.preprocessing import Preprocessing
    from flowerml.registry.release import load_version
    from flowerml.registry.versions import CARD_FIELDS

    registry, cache = registry_copy(registered_run, tmp_path)
    own = Preprocessing(44, 40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                        interpolation="bicubic")
    card = {k: v for k, v in registry.get(1).card.items() if k not in CARD_FIELDS}
    registry.register(registry.load_weights(1), {**card, "preprocessing": own.to_json()})
    export = export_version(registry, 2, cache_dir=cache, workers=0)
    assert export.passed
    assert export.record["input"]["preprocessing"] == (
        "resize the short side to 44 (bicubic), centre-crop 40; the graph normalises "
        "(mean [0.5, 0.4, 0.3], std [0.2, 0.25, 0.3])")
    assert list(cache.rglob("test-44px-crop40-bicubic-*.npy"))
    model = load_version(registry, 2, device="cpu").model.eval()
    pixels = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    mean = torch.tensor(own.mean).view(1, 3, 1, 1)
    std = torch.tensor(own.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((pixels.float() / 255 - mean) / std).numpy()
    actual = build_onnx_session(load_onnx_bytes(registry, 2)[0]).run(
        None, {"images": pixels.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-3)


def test_the_calibration_sample_is_rebatched_in_manifest_order() -> None:
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    loader = [(images[i:i + 3], None) for i in range(0, 10, 3)]
    batches = list(sample_batches(loader, 10, wanted=5, batch=2))
    assert [b.ravel().tolist() for b in batches] == [[0, 2], [4, 7], [9]]
