"""Predicting flower names for image files: one result per input, in bounded memory.

- `expand_inputs`: what the user named (files, folders, glob patterns) as a sequence of
  `ImageInput`s, each an image to read or an input that failed already (nothing matched).
  A folder gives the image files under it (by extension, hidden names skipped), recursively,
  in sorted order. A pattern is expanded here too, for shells (and callers) that pass it on
  unexpanded.
- `open_image`: one image decoded for the model. A large JPEG is decoded at a reduced scale
  (PIL's `draft`, 1/2 to 1/8) no smaller than the model's resize needs, and nothing over PIL's
  decompression-bomb limit is decoded at all. A file is read only when it is a regular file
  (a FIFO or a device named as an image, or found in a folder, is that input's error, never a
  read that blocks or never ends), and no further than `MAX_IMAGE_BYTES`.
- `image_pixels`: an image as a model's input: uint8 [3, S, S], resized and centre-cropped.
- `predict_inputs`: rows `{"image", "predictions"}` or `{"image", "error"}`, one per input, in
  input order, `batch_size` images decoded and classified at a time by a `Scorer` (PyTorch or
  ONNX Runtime).
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from flowerml.cache import cache_resolution
from flowerml.errors import UserError
from flowerml.files import FileRefused, open_user_file
from flowerml.runtimes import Scorer, softmax_top_k

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""What a folder is searched for (any case); a file named on its own is tried whatever its name.
The one list: `flowerml score` keeps the same files of a folder, a pattern or a prefix."""

MAX_IMAGE_BYTES = 512 * 2**20
"""The largest image file read: twice the largest uncompressed 8-bit RGB image that PIL's
decompression-bomb limit lets through (89.5 megapixels, 256 MiB)."""

DEFAULT_BATCH_SIZE = 32


class ImageError(Exception):
    """One input that cannot be predicted; its message goes in the input's row."""


@dataclass(frozen=True)
class ImageInput:
    """One result to come: `name` as the user will see it, and either a file to read or the
    reason there is none."""

    name: str
    path: Path | None = None
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(arguments: Iterable[str | os.PathLike]) -> Iterator[ImageInput]:
    """The images the arguments name, in argument order; a folder's in sorted order."""
    for argument in arguments:
        name = os.fspath(argument)
        if name == "":
            yield ImageInput(name, error="empty path")
        elif os.path.lexists(name) or not is_pattern(name):
            yield from expand_path(name)
        else:
            matches = sorted(glob.glob(name, recursive=True))
            if not matches:
                yield ImageInput(name, error="no file matches this pattern")
            for match in matches:
                yield from expand_path(match)


def is_pattern(name: str) -> bool:
    return any(character in name for character in "*?[")


def expand_path(name: str) -> Iterator[ImageInput]:
    if os.path.isdir(name):
        yield from folder_images(name)
    elif os.path.lexists(name):
        yield ImageInput(name, Path(name))
    else:
        yield ImageInput(name, error="no such file or folder")


def folder_images(folder: str) -> Iterator[ImageInput]:
    """The image files under `folder`, sorted; a folder without any is one failed input."""
    found: list[tuple[tuple[str, ...], str]] = []
    unreadable: list[OSError] = []
    for root, folders, files in os.walk(folder, onerror=unreadable.append):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for file in files:
            if not file.startswith(".") and file.lower().endswith(IMAGE_SUFFIXES):
                path = os.path.join(root, file)
                found.append((Path(os.path.relpath(path, folder)).parts, path))
    for error in unreadable:
        yield ImageInput(error.filename or folder,
                         error=f"cannot read folder: {error.strerror or error}")
    if not found and not unreadable:
        yield ImageInput(folder, error=f"no images in this folder (looked for "
                                       f"{', '.join(IMAGE_SUFFIXES)})")
    for _, path in sorted(found):
        yield ImageInput(path, Path(path))


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


def image_pixels(source: Path | BinaryIO, image_size: int) -> np.ndarray:
    """uint8 [3, S, S]: the image decoded (reduced when large), its short side resized to
    round(S*256/224) and the centre S x S kept, as the ONNX export's input contract says
    (`flowerml.runtimes.Scorer`). One resize does both, on the crop's box in the original."""
    short_side = cache_resolution(image_size)
    image = open_image(source, short_side)
    width, height = image.size
    half = min(width, height) * image_size / short_side / 2
    box = (width / 2 - half, height / 2 - half, width / 2 + half, height / 2 + half)
    try:
        crop = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
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


def decode_input(item: ImageInput, image_size: int) -> np.ndarray:
    if item.path is None:
        raise ImageError(item.error or "no file")
    return image_pixels(item.path, image_size)


# --------------------------------------------------------------------------------------------
# Predicting


def predict_inputs(scorer: Scorer, inputs: Iterable[ImageInput], *, top_k: int = 5,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict]:
    """One row per input, in order: `{"image", "predictions": [{label, name, probability}]}`
    with the top-k flowers, or `{"image", "error"}`. At most `batch_size` images are decoded
    at a time; `scorer` runs them (PyTorch or ONNX Runtime, `flowerml.runtimes`)."""
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
                decoded.append(decode_input(item, scorer.image_size))
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
    """`predict_inputs` over files, folders and patterns, as a list."""
    return list(predict_inputs(scorer, expand_inputs(paths), top_k=top_k,
                               batch_size=batch_size))
