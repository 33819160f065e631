"""flowerml.evaluation.predictions: the stored per-image predictions' format, row by row."""

from __future__ import annotations

import pytest

from flowerml.evaluation.predictions import (
    ComparisonError,
    ImagePrediction,
    decode_predictions,
    encode_predictions,
)
from tests.helpers.paired import prediction_set


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
