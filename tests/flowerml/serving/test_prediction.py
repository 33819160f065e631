"""flowerml.serving.prediction: images decoded safely and reduced, one row per input in batches, with
the tiny trained run's model (the inputs' rules: tests/flowerml/serving/test_inputs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowerml.data.preprocessing import Preprocessing, default_preprocessing
from flowerml.evaluation.inference import load_trained_model
from flowerml.serving.inputs import ImageInput
from flowerml.serving.prediction import (
    ImageError,
    image_pixels,
    open_image,
    predict_images,
    predict_inputs,
)
from flowerml.serving.runtimes import Scorer, scorer_from_model
from tests.helpers.images import write_jpeg, write_png_header, write_truncated_jpeg
from tests.helpers.stores import StoreAndCache

# --- image files a user may hand over: tests/helpers/images.py ---------------------------------

@pytest.fixture(scope="module")
def model(tiny_run: StoreAndCache) -> Scorer:
    store, _ = tiny_run
    return scorer_from_model(load_trained_model(store, "tiny", "cpu"))


@pytest.fixture(scope="module")
def test_images(tiny_run: StoreAndCache) -> list[Path]:
    store, _ = tiny_run
    return sorted((store.root / "datasets").rglob("test/*/*.jpg"))[:5]


# --- open_image ------------------------------------------------------------------------------


def test_a_large_jpeg_is_decoded_reduced_but_never_below_the_size_asked(tmp_path: Path) -> None:
    photo = write_jpeg(tmp_path / "large.jpg", 2400, 1600)
    assert open_image(photo, 46).size == (300, 200)  # 1/8: both sides still >= 46
    assert open_image(photo, 256).size == (600, 400)  # 1/4: 1/8 would give 200 < 256
    assert open_image(photo, 1600).size == (2400, 1600)
    assert open_image(photo, 46).mode == "RGB"


def test_a_png_is_decoded_whole(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.new("L", (400, 300), 128).save(path)
    image = open_image(path, 46)
    assert image.size == (400, 300) and image.mode == "RGB"


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.jpg", "no such file"),
    (lambda d: d, "is a folder"),
    (lambda d: (d / "notes.jpg", (d / "notes.jpg").write_text("not an image"))[0],
     "not an image file"),
    (lambda d: write_truncated_jpeg(d / "cut.jpg"), "unreadable image: image file is truncated"),
    (lambda d: write_png_header(d / "bomb.png", 30_000, 30_000),
     "too large to decode safely: Image size (900000000 pixels) exceeds limit of 178956970 "
     "pixels"),
    (lambda d: write_png_header(d / "big.png", 10_000, 10_000),
     "too large to decode safely: 10000x10000 is 100000000 pixels, over the limit of 89478485"),
])
def test_unreadable_inputs_say_why(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ImageError) as raised:
        open_image(make(tmp_path), 46)
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_jpeg_over_the_pixel_limit_is_decoded_reduced(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Below PIL's hard limit a large JPEG is decoded at 1/8 scale, so it passes the limit; a
    PNG of the same size cannot be reduced and is refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    photo = write_jpeg(tmp_path / "photo.jpg", 1600, 1200)  # 1.92 MP: PIL warns, not refuses
    with pytest.warns(Image.DecompressionBombWarning), Image.open(photo) as whole:
        whole.save(tmp_path / "photo.png")
    assert open_image(photo, 46).size == (200, 150)
    with pytest.raises(ImageError, match="1600x1200 is 1920000 pixels, over the limit of 1000000"):
        open_image(tmp_path / "photo.png", 46)


# --- predict_inputs --------------------------------------------------------------------------


def test_one_row_per_input_in_order_failures_in_their_rows(model: Scorer,
                                                          test_images: list[Path],
                                                          tmp_path: Path) -> None:
    bomb = write_png_header(tmp_path / "bomb.png", 30_000, 30_000)
    cut = write_truncated_jpeg(tmp_path / "cut.jpg")
    large = write_jpeg(tmp_path / "large.jpg", 2400, 1600)
    arguments = [test_images[0], tmp_path / "missing.jpg", bomb, test_images[1], cut, large]
    rows = predict_images(model, arguments, top_k=3, batch_size=2)
    assert [row["image"] for row in rows] == [str(a) for a in arguments]
    assert [set(row) for row in rows] == [{"image", "predictions"}, {"image", "error"},
                                          {"image", "error"}, {"image", "predictions"},
                                          {"image", "error"}, {"image", "predictions"}]
    assert rows[1]["error"] == "no such file or folder"
    assert rows[2]["error"].startswith("too large to decode safely")
    assert rows[4]["error"].startswith("unreadable image: image file is truncated")
    for row in (rows[0], rows[3], rows[5]):
        probabilities = [p["probability"] for p in row["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0001
        assert {p["name"] for p in row["predictions"]} <= set(model.class_names)
        assert all(model.class_names[p["label"] - 1] == p["name"] for p in row["predictions"])


def test_batching_does_not_change_the_results(model: Scorer,
                                              test_images: list[Path]) -> None:
    one_batch = predict_images(model, test_images, top_k=4, batch_size=32)
    in_pairs = predict_images(model, test_images, top_k=4, batch_size=2)
    assert [[p["label"] for p in row["predictions"]] for row in one_batch] == \
        [[p["label"] for p in row["predictions"]] for row in in_pairs]
    for ours, theirs in zip(one_batch, in_pairs, strict=True):
        assert [p["probability"] for p in ours["predictions"]] == pytest.approx(
            [p["probability"] for p in theirs["predictions"]], abs=1e-4)


def test_images_are_read_a_batch_at_a_time(model: Scorer, test_images: list[Path]) -> None:
    taken: list[int] = []

    def inputs() -> Iterator[ImageInput]:
        for index, path in enumerate(test_images):
            taken.append(index)
            yield ImageInput(str(path), path)

    rows = predict_inputs(model, inputs(), batch_size=2)
    next(rows)
    assert len(taken) == 2  # the first row came before the third image was even listed
    assert len(list(rows)) == len(test_images) - 1


def test_top_k_beyond_the_classes_gives_every_class(model: Scorer,
                                                    test_images: list[Path]) -> None:
    [row] = predict_images(model, test_images[:1], top_k=50)
    assert sorted(p["name"] for p in row["predictions"]) == sorted(model.class_names)
    assert sum(p["probability"] for p in row["predictions"]) == pytest.approx(1, abs=1e-4)


def test_images_are_read_by_the_models_recorded_preprocessing(tmp_path: Path) -> None:
    """A scorer's preprocessing (what its card records) is how predict decodes each input:
    torchvision's resize of the weights, not today's 256/224, reaches the model."""
    seen: list[np.ndarray] = []

    def logits(pixels: np.ndarray) -> np.ndarray:
        seen.append(pixels)
        return np.zeros((len(pixels), 2), np.float32)

    resnet152_v2 = Preprocessing(232, 224)
    scorer = Scorer("m:000001", "onnx", "0" * 64, 224, ("a", "b"), logits, resnet152_v2)
    path = write_jpeg(tmp_path / "flower.jpg", 400, 300, seed=3)
    predict_images(scorer, [path], top_k=1)
    assert np.array_equal(seen[0][0], image_pixels(path, resnet152_v2))
    assert not np.array_equal(seen[0][0], image_pixels(path, 224))  # today's 256/224
    assert Scorer("m:000001", "onnx", "0" * 64, 224, ("a", "b"), logits).preprocessing == \
        default_preprocessing(224)
