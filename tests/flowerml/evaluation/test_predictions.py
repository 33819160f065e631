"""flowerml.evaluation.predictions: the stored per-image predictions' format, row by row, and
metrics.json, which names them."""

from __future__ import annotations

import hashlib
import json

import pytest

from flowerml.core.documents import plain
from flowerml.evaluation.predictions import (
    ComparisonError,
    EvaluationMetrics,
    ImagePrediction,
    PredictionsMissing,
    decode_predictions,
    encode_predictions,
    predictions_record,
    run_predictions,
)
from flowerml.io.storage_local import LocalStore
from flowerml.training.runs import DamagedRunFile, RunFiles
from tests.helpers.paired import prediction_set
from tests.helpers.stored_documents import fixture_bytes


def test_rows_round_trip_and_a_bad_line_is_named() -> None:
    rows = prediction_set("a", [(1, 1), (2, 3)]).images
    data = encode_predictions(rows)
    assert data.decode().splitlines()[0] == ('{"key":"test/001/image_00001.jpg","label":1,'
                                             '"top5":[1,2,3,4],"probs":[0.7,0.1,0.1,0.1]}')
    assert tuple(decode_predictions(data, "p.jsonl")) == rows
    with pytest.raises(ComparisonError, match="p.jsonl: line 2 is not JSON"):
        decode_predictions(data.splitlines()[0] + b"\n{oops\n", "p.jsonl")
    with pytest.raises(ComparisonError, match="p.jsonl: line 1: not a prediction row"):
        decode_predictions(b'{"key": "k", "label": 0, "top5": [1], "probs": [1.0]}\n',
                           "p.jsonl")
    assert ImagePrediction("k", 2, (2, 1), (0.6, 0.4)).correct


# --------------------------------------------------------------------------------------------
# metrics.json and its predictions block


def test_metrics_json_as_written_before_its_model_reads_back_byte_for_byte(
        local_store: LocalStore) -> None:
    run = RunFiles(local_store, "run-1")
    local_store.put_bytes(run.key("eval/test/metrics.json"), fixture_bytes("metrics.json"))
    metrics = run.read("eval/test/metrics.json", EvaluationMetrics)
    assert metrics.predictions.weights_sha256 == "7" * 64
    run.write("eval/test/metrics.json", metrics)
    assert local_store.get_bytes(run.key("eval/test/metrics.json")) == fixture_bytes(
        "metrics.json")


def test_predictions_record_names_the_file_and_its_sha256() -> None:
    record = predictions_record(b"rows\n", dataset="flowers102@abc", manifest_sha256="1" * 64,
                                split="test", weights_sha256="2" * 64)
    assert plain(record) == {"file": "predictions.jsonl", "sha256": hashlib.sha256(
        b"rows\n").hexdigest(), "dataset": "flowers102@abc", "manifest_sha256": "1" * 64,
        "split": "test", "weights_sha256": "2" * 64}


@pytest.mark.parametrize(("change", "problem"), [
    (lambda m: m["predictions"].pop("weights_sha256"), "field predictions.weights_sha256: "
     "Field required"),
    (lambda m: m.update(top1="0.9"), "field top1: Input should be a valid number (got '0.9')"),
])
def test_an_edited_metrics_json_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                                  change, problem: str) -> None:
    run = RunFiles(local_store, "run-1")
    local_store.put_bytes(run.key("config.json"), fixture_bytes("config.json"))
    metrics = json.loads(fixture_bytes("metrics.json"))
    change(metrics)
    local_store.put_bytes(run.key("eval/test/metrics.json"), json.dumps(metrics).encode())
    with pytest.raises(DamagedRunFile) as caught:
        run_predictions(local_store, "run-1")
    assert str(caught.value) == f"runs/run-1/eval/test/metrics.json: {problem}"


def test_metrics_from_before_predictions_were_kept_say_how_to_fix(
        local_store: LocalStore) -> None:
    run = RunFiles(local_store, "run-1")
    local_store.put_bytes(run.key("config.json"), fixture_bytes("config.json"))
    metrics = json.loads(fixture_bytes("metrics.json"))
    del metrics["predictions"]
    local_store.put_bytes(run.key("eval/test/metrics.json"), json.dumps(metrics).encode())
    with pytest.raises(PredictionsMissing) as caught:
        run_predictions(local_store, "run-1")
    assert str(caught.value) == ("run:run-1 has no stored per-image predictions (evaluated "
                                 "before evaluation kept them): run flowerml evaluate --run "
                                 "run-1 again")
