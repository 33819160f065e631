"""Predicting flower names for image files: one result per input, in bounded memory.

The inputs come from `flowerml.serving.inputs.expand_inputs` (files, folders, globs, list files,
s3:// keys and prefixes, by the rules `flowerml score` follows too).

- `open_image`: one image decoded for the model. A large JPEG is decoded at a reduced scale
  (PIL's `draft`, 1/2 to 1/8) no smaller than the model's resize needs, and nothing over PIL's
  decompression-bomb limit is decoded at all. A file is read only when it is a regular file
  (a FIFO or a device named as an image, or found in a folder, is that input's error, never a
  read that blocks or never ends), and no further than `MAX_IMAGE_BYTES`.
- `image_pixels`: an image as a model's input: uint8 [3, S, S], resized and centre-cropped by
  the model's recorded `Preprocessing`.
- `predict_inputs`: rows `{"image", "predictions"}` or `{"image", "error"}`, one per input, in
  input order, `batch_size` images decoded and classified at a time by a `Scorer` (PyTorch or
  ONNX Runtime).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from flowerml.core.errors import UserError
from flowerml.core.files import FileRefused, open_user_file
from flowerml.data.preprocessing import FILTERS, Preprocessing, default_preprocessing
from flowerml.serving.inputs import MAX_IMAGE_BYTES, ImageInput, ImageUnreadable, expand_inputs
from flowerml.serving.runtimes import Scorer, softmax_top_k

DEFAULT_BATCH_SIZE = 32


class ImageError(Exception):
    """One input that cannot be predicted; its message goes in the input's row."""


# --------------------------------------------------------------------------------------------
# Decoding


def open_image(path: Path | BinaryIO, short_side: int) -> Image.Image:
    """`path` decoded as RGB; a JPEG at the smallest scale PIL offers whose sides are both at
    least `short_side`. Raises ImageError saying why an input cannot be read."""
    if not isinstance(path, str | os.PathLike):
        return decode_image(path, short_side)
    try:
        with open_user_file(path, limit=MAX_IMAGE_BYTES, what="an image file") as handle:
            return decode_image(handle, short_side)
    except FileRefused as refused:
        raise ImageError(refused.reason) from None


def decode_image(source: BinaryIO, short_side: int) -> Image.Image:
    """`open_image` of an open file (or bytes in memory)."""
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it; the size is checked below, after the
            # draft has reduced what will actually be decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.draft("RGB", (short_side, short_side))
                check_pixels(image.size)
                return image.convert("RGB")
    except ImageError:
        raise
    except FileRefused as refused:  # past the cap while PIL read it
        raise ImageError(refused.reason) from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"too large to decode safely: {str(error).split(', could')[0]}") \
            from None
    except UnidentifiedImageError:
        raise ImageError("not an image file (or not a format PIL can read)") from None
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError,
        # ValueError, EOFError, struct.error... on damaged files; each is this input's failure.
        raise ImageError(f"unreadable image: {describe(error)}") from None


def image_pixels(source: Path | BinaryIO, preprocessing: Preprocessing | int) -> np.ndarray:
    """uint8 [3, S, S]: the image decoded (reduced when large), its short side resized to the
    model's `preprocessing.resize` and the centre S x S kept (S = its crop), with its filter,
    as the ONNX export's input contract says (`flowerml.serving.runtimes.Scorer`): torchvision's
    Resize + CenterCrop pixels. One resize does both, on the crop's box in the original
    (`Preprocessing.crop_box`). An int is an image size with today's preprocessing
    (`default_preprocessing`)."""
    if isinstance(preprocessing, int):
        preprocessing = default_preprocessing(preprocessing)
    size = preprocessing.crop
    image = open_image(source, preprocessing.resize)
    try:
        crop = image.resize((size, size), FILTERS[preprocessing.interpolation],
                            box=preprocessing.crop_box(*image.size))
    except Exception as error:  # noqa: BLE001 - an odd image PIL cannot resize
        raise ImageError(f"unreadable image: {describe(error)}") from None
    return np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1))


def check_pixels(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit and width * height > limit:
        raise ImageError(f"too large to decode safely: {width}x{height} is "
                         f"{width * height} pixels, over the limit of {limit}")


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def decode_input(item: ImageInput, preprocessing: Preprocessing) -> np.ndarray:
    if item.path is not None:
        return image_pixels(item.path, preprocessing)
    if item.fetch is None:
        raise ImageError(item.error or "no file")
    try:
        data = item.fetch()
    except ImageUnreadable as error:
        raise ImageError(str(error)) from None
    return image_pixels(io.BytesIO(data), preprocessing)


# --------------------------------------------------------------------------------------------
# Predicting


def predict_inputs(scorer: Scorer, inputs: Iterable[ImageInput], *, top_k: int = 5,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict]:
    """One row per input, in order: `{"image", "predictions": [{label, name, probability}]}`
    with the top-k flowers, or `{"image", "error"}`. At most `batch_size` images are decoded
    at a time; `scorer` runs them (PyTorch or ONNX Runtime, `flowerml.serving.runtimes`)."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    top_k = min(top_k, len(scorer.class_names))
    pending = iter(inputs)
    while batch := list(islice(pending, batch_size)):
        decoded: list[np.ndarray | ImageError] = []
        for item in batch:
            try:
                decoded.append(decode_input(item, scorer.preprocessing))
            except ImageError as error:
                decoded.append(error)
        images = [d for d in decoded if isinstance(d, np.ndarray)]
        ranked = iter(softmax_top_k(scorer, np.stack(images), top_k) if images else [])
        for item, outcome in zip(batch, decoded, strict=True):
            if isinstance(outcome, ImageError):
                yield {"image": item.name, "error": str(outcome)}
            else:
                indices, probabilities = next(ranked)
                yield {"image": item.name, "predictions": [
                    {"label": i + 1, "name": scorer.class_names[i], "probability": round(p, 5)}
                    for i, p in zip(indices, probabilities, strict=True)]}


def predict_images(scorer: Scorer, paths: Iterable[str | os.PathLike], top_k: int = 5,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
    """`predict_inputs` over what `flowerml.serving.inputs.expand_inputs` takes, as a list."""
    return list(predict_inputs(scorer, expand_inputs(paths), top_k=top_k,
                               batch_size=batch_size))
