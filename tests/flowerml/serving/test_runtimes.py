"""Choosing and loading a runtime: `auto` takes int8 on a CPU only when it passed its gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowerml.io.storage_local import LocalStore
from flowerml.registry.export_record import EXPORT_JSON, ExportError
from flowerml.registry.versions import Registry
from flowerml.serving.export import export_version
from flowerml.serving.runtimes import (
    RuntimeRefused,
    auto_runtime,
    choose_runtime,
    load_scorer,
)
from tests.helpers.cli import invoke
from tests.helpers.registries import made_once, registry_copy, session_folder
from tests.helpers.stores import copy_tree, replace_file
from tests.helpers.synthetic import DATASET, RegisteredRun


def record(parity: bool, int8: bool | None) -> dict:
    return {"parity": {"passed": parity},
            "int8": None if int8 is None else {"gate": {"passed": int8}}}


@pytest.mark.parametrize(("export", "chosen"), [
    (None, "torch"),
    (record(False, None), "torch"),
    (record(False, True), "torch"),
    (record(True, None), "onnx"),
    (record(True, False), "onnx"),
    (record(True, True), "onnx-int8"),
])
def test_auto_takes_int8_only_when_it_passed_its_gate(export, chosen: str) -> None:
    assert auto_runtime(export) == chosen


@pytest.fixture(scope="module")
def int8_root(registered_run: RegisteredRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered tiny run exported with int8, once per module (tests copy it; its fp32 and
    int8 graphs made once a session, tests/helpers/registries.py)."""
    root = tmp_path_factory.mktemp("int8-registry")
    registry, cache = registry_copy(registered_run, root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        made_once(monkeypatch, session_folder(root.parent))
        export = export_version(registry, 1, cache_dir=cache, workers=0, quantize="int8")
    assert export.passed and export.int8_passed  # the tiny model: one class for every image
    return root


def own_copy(root: Path, dest: Path) -> Registry:
    copy_tree(root / "store", dest)
    return Registry(LocalStore(dest), DATASET)


def fail_int8_gate(registry: Registry) -> None:
    path = registry.store.root / registry.attachment_key(1, EXPORT_JSON)
    export = json.loads(path.read_bytes())
    export["int8"]["gate"]["passed"] = False
    replace_file(path, json.dumps(export).encode())


def test_auto_runs_the_int8_graph_that_passed(int8_root: Path, tmp_path: Path) -> None:
    registry = own_copy(int8_root, tmp_path / "store")
    runtime, sha256 = choose_runtime(registry, 1, "auto")
    export = json.loads(registry.read_attachment(1, EXPORT_JSON))
    assert (runtime, sha256) == ("onnx-int8", export["int8"]["sha256"])
    scorer = load_scorer(registry, 1, runtime, sha256)
    pixels = np.zeros((2, 3, scorer.image_size, scorer.image_size), np.uint8)
    assert scorer.runtime == "onnx-int8" and scorer.logits(pixels).shape == (2, 4)
    assert choose_runtime(registry, 1, "onnx") == ("onnx", export["sha256"])


def test_a_failed_int8_leaves_auto_on_fp32_and_refuses_onnx_int8(int8_root: Path,
                                                                 tmp_path: Path) -> None:
    registry = own_copy(int8_root, tmp_path / "store")
    fail_int8_gate(registry)
    export = json.loads(registry.read_attachment(1, EXPORT_JSON))
    assert choose_runtime(registry, 1, "auto") == ("onnx", export["sha256"])
    with pytest.raises(RuntimeRefused) as refused:
        choose_runtime(registry, 1, "onnx-int8")
    assert str(refused.value) == ("flowers102:000001's int8 export failed its gate against "
                                  "fp32 (see export.json): use --runtime onnx")


def test_onnx_int8_without_an_int8_export_says_so(exported_registry, tmp_path: Path) -> None:
    registry = own_copy(exported_registry.root, tmp_path / "store")
    with pytest.raises(RuntimeRefused, match=r"^flowers102:000001 has no int8 export \(run: "
                                             r"flowerml export flowers102:1 --quantize int8, "):
        choose_runtime(registry, 1, "onnx-int8")
    assert choose_runtime(registry, 1, "auto")[0] == "onnx"


def test_a_tampered_int8_graph_is_refused(int8_root: Path, tmp_path: Path) -> None:
    registry = own_copy(int8_root, tmp_path / "store")
    path = registry.store.root / registry.attachment_key(1, "model.int8.onnx")
    replace_file(path, path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ExportError, match="model.int8.onnx fails its checksum"):
        choose_runtime(registry, 1, "auto")


def test_score_auto_runs_int8_and_records_its_file(int8_root: Path, photos: Path,
                                                   tmp_path: Path) -> None:
    """`flowerml score` with auto on a version whose int8 passed: the int8 graph scores, and
    _SUCCESS.json names it by runtime and sha256; the rows agree with the fp32 graph's."""
    registry = own_copy(int8_root, tmp_path / "store")
    export = json.loads(registry.read_attachment(1, EXPORT_JSON))

    def score(runtime: str) -> tuple[dict, list[dict]]:
        output = tmp_path / f"scores-{runtime}"
        result = invoke("score", str(photos), "--output", str(output), "--runtime", runtime,
                        "--json", store=registry.store, cache=tmp_path / "cache")
        assert result.exit_code == 1, result.output  # photos holds one unreadable image
        [success] = output.rglob("_SUCCESS.json")
        rows = [json.loads(line) for part in sorted(success.parent.glob("part-*.jsonl"))
                for line in part.read_text().splitlines()]
        return json.loads(success.read_text()), rows

    summary, rows = score("auto")
    assert (summary["runtime"], summary["sha256"]) == ("onnx-int8", export["int8"]["sha256"])
    _, fp32_rows = score("onnx")
    assert [row.get("labels", [None])[0] for row in rows] == \
        [row.get("labels", [None])[0] for row in fp32_rows]
