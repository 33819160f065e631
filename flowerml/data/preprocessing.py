"""The pixels a model expects: `Preprocessing` (resize, centre crop, interpolation, mean, std).

A model trained from torchvision weights is evaluated, served and exported with the
preprocessing those weights were measured with (`flowerml.models.weights.preprocessing_for`:
ResNet-152's IMAGENET1K_V2 resizes the short side to 232 for a 224 crop); a model trained
from scratch (`--weights none`), and any card or run that records none, reads as
`default_preprocessing`: the short side resized to round(S*256/224), the centre S x S kept,
bilinear, ImageNet mean and std. Run records and cards store it as `to_json()`'s dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from flowerml.core.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The classic ImageNet ratio: resize the short side to 256 for a 224 crop (the tutorial's
# Resize(256) + CenterCrop(224)): today's values for a model without weights of its own.
RESIZE_RATIO = 256 / 224
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
"""Pillow's filters (antialiased when reducing) for the two torchvision's classification
weights use."""
INTERPOLATIONS = tuple(FILTERS)


def cache_resolution(image_size: int) -> int:
    """The resize for training at `image_size` without weights of its own (224 -> 256)."""
    return round(image_size * RESIZE_RATIO)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resize` (`interpolation`), keep the centre `crop` x `crop`,
    then (x / 255 - mean) / std per RGB channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not 1 <= self.crop <= self.resize:
            raise DataError(f"preprocessing: the crop ({self.crop}) must be between 1 and the "
                            f"resize ({self.resize})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError("preprocessing: mean and std need 3 values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"preprocessing: interpolation must be one of "
                            f"{', '.join(INTERPOLATIONS)}: got {self.interpolation!r}")

    def to_json(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def crop_box(self, width: int, height: int,
                 side: int | None = None) -> tuple[float, float, float, float]:
        """The box of a `width` x `height` image that one Pillow resize to `side` x `side`
        (default: the crop) takes to sample the very points torchvision's Resize(resize) +
        CenterCrop(crop) keep: its resized long side truncated to whole pixels, its crop
        offsets rounded. A `side` larger than the crop keeps a margin around it, placed so
        that a CenterCrop(crop) of the square (the decode cache's) gives those pixels."""
        side = side or self.crop
        if width <= height:
            resized_width, resized_height = self.resize, int(self.resize * height / width)
        else:
            resized_width, resized_height = int(self.resize * width / height), self.resize
        margin = centre_offset(side, self.crop)
        left = centre_offset(resized_width, self.crop) - margin
        top = centre_offset(resized_height, self.crop) - margin
        x_scale, y_scale = width / resized_width, height / resized_height
        return (max(0.0, left * x_scale), max(0.0, top * y_scale),
                min(float(width), (left + side) * x_scale),
                min(float(height), (top + side) * y_scale))

    def describe(self) -> str:
        """One line, for export.json's input contract and reports."""
        return (f"resize the short side to {self.resize} ({self.interpolation}), centre-crop "
                f"{self.crop}; the graph normalises (mean {list(self.mean)}, std "
                f"{list(self.std)})")


def centre_offset(size: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts a `crop` in `size` pixels (rounded half to even,
    as Python's round: its own formula)."""
    return int(round((size - crop) / 2.0))


def default_preprocessing(image_size: int) -> Preprocessing:
    """Today's values for a model of `image_size` without weights of its own (224 -> 256)."""
    return Preprocessing(resize=cache_resolution(image_size), crop=image_size)


def recorded_preprocessing(recorded: Any, image_size: int) -> Preprocessing:
    """What a run record or a card holds (`to_json()`'s dict, or a document with those
    fields); `default_preprocessing(image_size)` when it holds none (written before the
    field existed)."""
    if recorded is None:
        return default_preprocessing(image_size)
    if not isinstance(recorded, dict):
        recorded = recorded.model_dump() if hasattr(recorded, "model_dump") else vars(recorded)
    return Preprocessing(resize=int(recorded["resize"]), crop=int(recorded["crop"]),
                         mean=tuple(recorded["mean"]), std=tuple(recorded["std"]),
                         interpolation=recorded.get("interpolation", "bilinear"))
