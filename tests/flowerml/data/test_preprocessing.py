"""flowerml.data.preprocessing: the pixels a model expects, as run records and cards store it,
and the box one Pillow resize takes to give torchvision's Resize + CenterCrop pixels."""

from __future__ import annotations

import json

import pytest

from flowerml.core.errors import DataError
from flowerml.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    default_preprocessing,
    recorded_preprocessing,
)

RESNET152_V2 = Preprocessing(resize=232, crop=224)


def test_the_default_is_todays_resize_crop_and_normalisation() -> None:
    assert default_preprocessing(224) == Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD,
                                                       "bilinear")
    assert default_preprocessing(32).resize == 37  # round(32 * 256 / 224)


def test_a_record_round_trips_and_an_absent_one_reads_as_todays() -> None:
    bicubic = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    for preprocessing in (RESNET152_V2, bicubic):
        stored = json.loads(json.dumps(preprocessing.to_json()))
        assert recorded_preprocessing(stored, 224) == preprocessing
    assert recorded_preprocessing(None, 224) == default_preprocessing(224)
    assert recorded_preprocessing(None, 96) == default_preprocessing(96)


@pytest.mark.parametrize(("fields", "message"), [
    ({"resize": 200, "crop": 224}, "the crop (224) must be between 1 and the resize (200)"),
    ({"resize": 232, "crop": 224, "interpolation": "nearest"},
     "interpolation must be one of bilinear, bicubic: got 'nearest'"),
    ({"resize": 232, "crop": 224, "std": (0.2, 0.0, 0.2)}, "mean and std need 3 values each"),
])
def test_a_preprocessing_that_cannot_be_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Preprocessing(**fields)


def test_the_crop_box_samples_torchvisions_resize_and_centre_crop() -> None:
    # 512 x 600 resized to 232 x 271 (the long side truncated, as torchvision does), then
    # 224 x 224 from (4, 24): offsets rounded half to even, CenterCrop's own formula.
    left, top, right, bottom = RESNET152_V2.crop_box(512, 600)
    x_scale, y_scale = 512 / 232, 600 / 271
    assert (left, right) == pytest.approx((4 * x_scale, 228 * x_scale))
    assert (top, bottom) == pytest.approx((24 * y_scale, 248 * y_scale))
    # The decode cache's 232 x 232 square keeps a margin of 4 around that crop.
    left, top, right, bottom = RESNET152_V2.crop_box(512, 600, side=232)
    assert (left, right) == pytest.approx((0, 512))
    assert (top, bottom) == pytest.approx((20 * y_scale, 252 * y_scale))
    # A wide image turns the geometry around.
    assert RESNET152_V2.crop_box(600, 512)[0] == pytest.approx(24 * 600 / 271)
