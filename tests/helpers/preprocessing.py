"""One real photo through torchvision's `weights.transforms()` and through flowerml's two pixel
paths (the decode cache the evaluation reads, and `image_pixels` that predict, score and the
ONNX graph's input take), each normalised as the model sees it."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from matplotlib import cbook
from PIL import Image

from flowerml.data.cache import decode_square
from flowerml.data.preprocessing import Preprocessing
from flowerml.data.transforms import build_transforms, normalising, prepare_batch
from flowerml.serving.prediction import image_pixels

PHOTO = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # 512 x 600, shipped
"""A real JPEG photograph (matplotlib's sample of Grace Hopper), so the comparison sees a
camera's edges and noise rather than a drawing's flat colours."""


def photo_variants(folder: Path) -> dict[str, Path]:
    """The photo as JPEGs of three shapes: `wide` and `tall` (short side 350 and 340: decoded
    at full scale for a 232 or 256 resize) and `whole` (512 x 600: short side over twice the
    resize, so the JPEG is decoded at half scale, flowerml's speed-up)."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(PHOTO) as image:
        rgb = image.convert("RGB")
    shapes = {"wide": rgb.crop((0, 100, 512, 450)), "tall": rgb.crop((60, 0, 400, 600)),
              "whole": rgb}
    paths = {}
    for name, picture in shapes.items():
        paths[name] = folder / f"{name}.jpg"
        picture.save(paths[name], quality=92)
    return paths


def torchvision_tensor(weights_name: str, path: Path) -> torch.Tensor:
    """float [3, S, S]: `weights.transforms()` of the JPEG, as torchvision measured them."""
    with Image.open(path) as image:
        return torchvision.models.get_weight(weights_name).transforms()(image.convert("RGB"))


def served_tensor(preprocessing: Preprocessing, path: Path) -> torch.Tensor:
    """float [3, S, S]: `image_pixels` (predict, score, the ONNX input), normalised."""
    pixels = torch.from_numpy(image_pixels(path, preprocessing))[None]
    return prepare_batch(pixels, "cpu", **normalising(preprocessing))[0]


def evaluated_tensor(preprocessing: Preprocessing, path: Path) -> torch.Tensor:
    """float [3, S, S]: the decode cache's square through the eval transform (as
    `CachedImageDataset` hands it to the loader), normalised."""
    square = torch.from_numpy(decode_square(path, preprocessing).copy()).permute(2, 0, 1)
    transform = build_transforms("standard", preprocessing.crop, train=False,
                                 preprocessing=preprocessing)
    return prepare_batch(transform(square)[None], "cpu", **normalising(preprocessing))[0]
