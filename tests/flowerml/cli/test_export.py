"""`flowerml export`: what a user sees, and every bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.io.storage_local import LocalStore
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.registries import (
    export_writes,
    int8_made_once,
    made_once,
    session_folder,
)
from tests.helpers.stores import copy_tree
from tests.helpers.synthetic import RegisteredRun

VERSION_DIR = "registry/flowers102/versions/000001"


def store_copy(registered_run: RegisteredRun, dest: Path) -> tuple[LocalStore, Path]:
    copy_tree(registered_run.store.root, dest / "store")
    copy_tree(registered_run.cache, dest / "cache")
    return LocalStore(dest / "store"), dest / "cache"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's graphs made once (tests/helpers/registries.py): what the command prints
    and refuses is the point here; serving/test_export.py checks the export itself."""
    return session_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(registered_run: RegisteredRun, graphs: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path, dict]:
    store, cache = store_copy(registered_run, tmp_path_factory.mktemp("cli-export"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        made_once(monkeypatch, graphs)
        result = invoke("export", "flowers102@production", "--workers", "0", "--json",
                        store=store, cache=cache)
    assert result.exit_code == 0, result.output
    return store, cache, json.loads(result.stdout)


def test_export_prints_where_the_file_went_and_its_parity(exported) -> None:
    store, _, summary = exported
    assert summary["created"] is True and summary["parity_passed"] is True
    assert summary["location"] == f"{store.root}/{VERSION_DIR}/model.onnx"
    assert Path(summary["location"]).stat().st_size == summary["bytes"]
    assert summary["version"] == 1 and summary["top1_agreement"] == 1.0


def test_export_again_says_it_was_exported_before(exported) -> None:
    store, cache, summary = exported
    result = invoke("export", "flowers102:1", "--workers", "0", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    assert "(exported before)" in result.stdout
    assert "parity passed: top-1 agreement 100.0000%" in result.stdout
    card = (store.root / VERSION_DIR / "card.md").read_text()
    assert "## Export" in card and summary["sha256"] in card


def test_a_tampered_onnx_file_is_refused(exported, tmp_path: Path) -> None:
    store, cache, _ = exported
    copy_tree(store.root, tmp_path / "store")
    onnx_file = tmp_path / "store" / VERSION_DIR / "model.onnx"
    onnx_file.unlink()  # a hard link to the module's export: replace it, never write into it
    onnx_file.write_bytes(b"not the exported graph")
    result = invoke("export", "flowers102", "--json", store=LocalStore(tmp_path / "store"),
                    cache=cache)
    assert_refused(result, f"{VERSION_DIR}/model.onnx fails its checksum")
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "bad-input"


@pytest.mark.parametrize(("ref", "message"), [
    ("flowers102@staging", "alias"),
    ("flowers102:7", "no version 000007"),
    ("Bad Name", "model name must be"),
])
def test_bad_references_are_refused(registered_run: RegisteredRun, ref: str,
                                    message: str) -> None:
    result = invoke("export", ref, store=registered_run.store, cache=registered_run.cache)
    assert_refused(result, message)


def test_an_uncommitted_version_is_refused_and_nothing_is_written(
        registered_run: RegisteredRun, tmp_path: Path) -> None:
    store, cache = store_copy(registered_run, tmp_path)
    (store.root / VERSION_DIR / "COMMITTED").unlink()
    result = invoke("export", "flowers102:1", store=store, cache=cache)
    assert_refused(result, "is not COMMITTED")
    assert not (store.root / VERSION_DIR / "model.onnx").exists()


def test_opset_out_of_range_is_refused(registered_run: RegisteredRun) -> None:
    result = invoke("export", "flowers102", "--opset", "9", store=registered_run.store)
    assert_refused(result, "--opset")


def test_predict_runs_the_export_and_agrees_with_pytorch(exported) -> None:
    store, cache, _ = exported
    images = sorted(cache.rglob("test/*/*.jpg"))[:6]
    rows = {}
    for runtime in ("onnx", "torch", "auto"):
        result = invoke("predict", *map(str, images), "--runtime", runtime, "--device", "cpu",
                        "--json", store=store, cache=cache)
        assert result.exit_code == 0, result.output
        rows[runtime] = [json.loads(line) for line in result.stdout.splitlines()]
    for onnx_row, torch_row in zip(rows["onnx"], rows["torch"], strict=True):
        assert onnx_row["predictions"][0]["label"] == torch_row["predictions"][0]["label"]
        assert abs(onnx_row["predictions"][0]["probability"]
                   - torch_row["predictions"][0]["probability"]) < 1e-3
    assert rows["auto"] == rows["onnx"]  # a passing export on the CPU: auto runs it


def test_predict_with_onnx_is_refused_without_an_export(registered_run: RegisteredRun) -> None:
    image = str(next(registered_run.cache.rglob("*.jpg")))
    result = invoke("predict", image, "--runtime", "onnx", store=registered_run.store,
                    cache=registered_run.cache)
    assert_refused(result, "has no ONNX export (run: flowerml export flowers102:1")
    result = invoke("predict", image, "--run", "tiny", "--runtime", "onnx",
                    store=registered_run.store, cache=registered_run.cache)
    assert_refused(result, "run 'tiny' has no ONNX export")


def test_export_quantize_int8_prints_its_gate_and_writes_the_graph(
        registered_run: RegisteredRun, exported, graphs: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In one go: fp32 (the module's graph of the same weights), its parity, then int8 (its
    graph quantised once a session)."""
    graph = (exported[0].root / VERSION_DIR / "model.onnx").read_bytes()
    export_writes(monkeypatch, graph, exported[2]["exporter"])
    int8_made_once(monkeypatch, graphs)
    store, cache = store_copy(registered_run, tmp_path)
    result = invoke("export", "flowers102@production", "--quantize", "int8", "--workers", "0",
                    store=store, cache=cache)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "(against the evaluation's logits, on CPUExecutionProvider)" in lines[1]
    assert lines[2].startswith("int8 passed its gate: top-1 agreement with fp32 100.00%, "
                               "test top-1 +0.00 points on 24 test images; ")
    assert (store.root / VERSION_DIR / "model.int8.onnx").is_file()
    assert "int8 passed its gate" in (store.root / VERSION_DIR / "card.md").read_text()


def test_a_failed_int8_gate_is_reported_and_the_version_is_promoted_on_fp32(
        registered_run: RegisteredRun, graphs: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A freshly initialised ResNet-18 (its top-1 varies over the test images), its int8 graph
    calibrated on one all-zero image: the export passes parity (exit 0), says in one line that
    int8 failed and that the version serves on fp32, the card says so, and promotion goes
    ahead on fp32 with that reason. (Both graphs made once a session: serving/test_export.py's
    blank-calibration test is the same pair.)"""
    made_once(monkeypatch, graphs)
    import numpy as np

    from flowerml.models.backbones import build_model
    from flowerml.registry.gates import INT8_FAILED, Scorecard
    from flowerml.registry.promotion import promote
    from flowerml.registry.versions import Registry
    from flowerml.serving import export as export_module

    store, cache = store_copy(registered_run, tmp_path)
    registry = Registry(store, "flowers102")
    card = {k: v for k, v in registry.get(1).card.items() if k not in {"model", "version"}}
    registry.register(build_model("resnet18", 4, seed=3).state_dict(), card)
    size = card["image_size"]
    monkeypatch.setattr(export_module, "calibration_batches",
                        lambda *args: [np.zeros((1, 3, size, size), np.uint8)])
    result = invoke("export", "flowers102:2", "--quantize", "int8", "--workers", "0",
                    "--json", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parity_passed"] is True and summary["parity_reference"] == "pytorch"
    assert summary["int8_passed"] is False
    assert (summary["int8_top1_agreement"] < 0.99 or summary["int8_top1_delta"] < -0.005)
    text = invoke("export", "flowers102:2", "--quantize", "int8", "--workers", "0",
                  store=store, cache=cache).stdout
    assert text.splitlines()[-1].startswith("int8 FAILED its gate (top-1 agreement with fp32 ")
    assert text.splitlines()[-1].endswith("): the version is promoted and served on fp32 ONNX; "
                                          "--runtime auto will not take int8")
    assert "int8 FAILED its gate" in (store.root / registry.attachment_key(2, "card.md")
                                      ).read_text()
    ok, reasons, state = promote(registry, 2, scorecard=Scorecard.from_card(
        registry.get(2).card, 2), force=True)
    assert ok and state.version == 2 and INT8_FAILED in reasons
