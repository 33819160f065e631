"""Transforms: the augmentation presets, and a uint8 batch made ready for the model.

- `build_transforms(preset, size, train=...)`: the `standard`, `tutorial` and `none` presets.
  `standard` and `none` work on the decode cache's uint8 [3, R, R] tensors and return uint8
  [3, S, S]; `tutorial` is the original notebook's PIL pipeline on the full-size JPEGs, its
  eval resize and normalisation the model's `Preprocessing`.
- `prepare_batch`: uint8 -> normalised float on the device (ImageNet mean and std unless the
  model's preprocessing says otherwise).

Why `standard` keeps two hand-written ops (`ChannelsLastResizedCrop`, `FusedColorJitter`) rather
than stock torchvision v2 ones: the stock ops miss the loader's target of 5x the tutorial's
images/s per core even with the hue jitter left out (v2 ColorJitter's HSV round trip for hue
alone was measured at ~3.6 ms per image, more than the whole pipeline). Measured with `bench/loader.py` in one run (1,020 JPEGs ~470 px,
batch 48, one core, 2-core machine; bench/results/loader-2core.json): tutorial 198.8 images/s;
stock v2 RandomResizedCrop + flip + ColorJitter(0.2, 0.2, 0.2, hue=0) 890.6 images/s (4.48x);
the hand-written ops, hue included, 1,491.4 images/s (7.5x). Re-run the bench before replacing
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, get_args

import numpy as np
import torch
from torchvision.transforms import v2

from flowerml.core.errors import DataError
from flowerml.core.recipes import Augment
from flowerml.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    default_preprocessing,
)

PRESETS: tuple[str, ...] = get_args(Augment)  # declared once, in flowerml/core/recipes.py


def planar(image: torch.Tensor) -> torch.Tensor:
    """`image` as a contiguous [3, H, W] tensor. NumPy's strided uint8 copy is about twice as
    fast as torch's for the channels-last -> planar transpose."""
    if image.is_contiguous():
        return image
    return torch.from_numpy(np.ascontiguousarray(image.numpy()))


class ToPlanar(torch.nn.Module):
    """Makes the image a contiguous [3, H, W] tensor, so the batch collates with a memcpy."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return planar(image)


class ChannelsLastResizedCrop(v2.RandomResizedCrop):
    """torchvision's v2 RandomResizedCrop (same parameters, same random draws), with a fast
    path for uint8 [3, H, W] tensors.

    torch's antialiased bilinear kernel for uint8 works in channels-last layout; a strided
    crop of the cache is repacked into it and back inside the kernel, which costs more than
    the resize itself. Packing the crop channels-last once, resizing, then transposing to
    planar with NumPy is ~2x faster and gives the same pixels. The output is a contiguous
    [3, S, S] uint8 tensor.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if (type(inpt) is not torch.Tensor or inpt.dtype != torch.uint8 or inpt.dim() != 3
                or self.interpolation not in (v2.InterpolationMode.BILINEAR, "bilinear")
                or not self.antialias):
            return super().transform(inpt, params)
        top, left = params["top"], params["left"]
        crop = inpt[:, top:top + params["height"], left:left + params["width"]]
        packed = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        resized = torch.nn.functional.interpolate(packed, size=list(self.size), mode="bilinear",
                                                  antialias=True, align_corners=False)
        return planar(resized[0])


class FusedColorJitter(torch.nn.Module):
    """Brightness, contrast, saturation and hue jitter on a uint8 [3, H, W] tensor in one pass.

    Each of the four adjustments is affine in RGB (hue as a rotation about the grey axis, the
    small-angle stand-in for an HSV hue shift), so they compose into one 3x3 matrix and an
    offset applied with a single matmul: ~20x cheaper than torchvision's ColorJitter on
    tensors, whose HSV round trip for hue alone costs more than the rest of the pipeline.
    Factors are drawn like ColorJitter's (uniform in [1-x, 1+x], hue in [-h, h]) from torch's
    RNG, so DataLoader workers' seeding applies; the order is fixed (brightness, contrast,
    saturation, hue) and only the result is clamped. Applied with probability `p`.
    """

    GREY = (0.299, 0.587, 0.114)

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.02, p: float = 0.8) -> None:
        super().__init__()
        if not 0 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0 or not 0 <= p <= 1:
            raise ValueError("jitter amounts must be >= 0, hue <= 0.5 and p in [0, 1]")
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)
        self.p = p

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p}")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(5).tolist()
        return image if draws[4] >= self.p else self.apply(image, draws[:4])

    def apply(self, image: torch.Tensor, draws: list[float]) -> torch.Tensor:
        """The jitter for four uniform draws in [0, 1) (brightness, contrast, saturation, hue)."""
        pixels = planar(image).reshape(3, -1).float()  # planar: channel-mixing is one matmul
        matrix, offset = self.affine(draws, pixels.mean(dim=1).tolist())
        # + 0.5 then truncation by the uint8 cast rounds to nearest. NumPy's float->uint8
        # cast is vectorised and several times faster than torch's on CPU.
        out = torch.addmm(torch.tensor(offset, dtype=torch.float32)[:, None] + 0.5,
                          torch.tensor(matrix, dtype=torch.float32), pixels)
        return torch.from_numpy(out.clamp_(0, 255).numpy().astype(np.uint8)).view(image.shape)

    def affine(self, draws: list[float],
               mean: list[float]) -> tuple[list[list[float]], list[float]]:
        """(3x3 matrix, offset) of the four adjustments for these uniform draws.

        Plain floats: on 3x3 matrices, NumPy's per-call overhead would cost more than the
        arithmetic on the whole image.
        """

        def factor(amount: float, draw: float) -> float:
            low = max(0.0, 1 - amount)
            return low + draw * (1 + amount - low)

        brightness = factor(self.brightness, draws[0])
        contrast = factor(self.contrast, draws[1])
        saturation = factor(self.saturation, draws[2])
        angle = (2 * draws[3] - 1) * self.hue * 2 * math.pi
        # Brightness scales; contrast then blends with the mean grey level at that point.
        grey_mean = brightness * sum(g * m for g, m in zip(self.GREY, mean, strict=True))
        scale, shift = brightness * contrast, (1 - contrast) * grey_mean
        desaturate = [[saturation * (i == j) + (1 - saturation) * self.GREY[j]
                       for j in range(3)] for i in range(3)]
        colour = matmul3(grey_axis_rotation(angle), desaturate)
        matrix = [[scale * value for value in row] for row in colour]
        offset = [shift * sum(row) for row in colour]  # colour @ (shift, shift, shift)
        return matrix, offset


def matmul3(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def grey_axis_rotation(angle: float) -> list[list[float]]:
    """Rodrigues' rotation about (1, 1, 1)/sqrt(3): turns hue, keeps the grey level."""
    k = 1 / math.sqrt(3)
    cos, sin = math.cos(angle), math.sin(angle)
    cross = ((0, -k, k), (k, 0, -k), (-k, k, 0))
    return [[cos * (i == j) + sin * cross[i][j] + (1 - cos) * k * k for j in range(3)]
            for i in range(3)]


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise DataError(f"--augment must be one of {', '.join(PRESETS)}: got {preset!r}")
    return preset


def build_transforms(preset: str, image_size: int = 224, *, train: bool,
                     preprocessing: Preprocessing | None = None) -> Callable:
    """The transform of a preset for training or evaluation; `preprocessing` is the model's
    (default: `default_preprocessing(image_size)`).

    - `standard`: on the uint8 decoded cache (short side `preprocessing.resize`, square). Train:
      RandomResizedCrop(S, scale 0.25-1) + horizontal flip + a mild colour jitter (p=0.8);
      flowers' colour is a class cue, so hue moves by at most 0.02 of the circle. Eval:
      CenterCrop(S) of the square, torchvision's Resize(resize) + CenterCrop(S). Output uint8
      [3, S, S]; `prepare_batch` normalises on the device.
    - `tutorial`: the original notebook's PIL transforms on the full-size JPEGs (eval: the
      preprocessing's resize, filter and crop), output normalised float (use with
      FolderImageDataset).
    - `none`: the eval transform for training too.
    """
    check_preset(preset)
    if image_size < 1:
        raise DataError(f"image size must be positive: got {image_size}")
    if preset == "tutorial":
        return tutorial_transform(image_size, train=train, preprocessing=preprocessing)
    if preset == "standard" and train:
        return standard_train_transform(image_size)
    return centre_crop_transform(image_size)


def standard_train_transform(image_size: int) -> Callable:
    return v2.Compose([
        ChannelsLastResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        FusedColorJitter(0.2, 0.2, 0.2, 0.02, p=0.8)])


def centre_crop_transform(image_size: int) -> Callable:
    return v2.Compose([v2.CenterCrop(image_size), ToPlanar()])


def tutorial_transform(image_size: int, *, train: bool,
                       preprocessing: Preprocessing | None = None) -> Callable:
    """The original notebook's PIL transforms, output normalised float."""
    from torchvision import transforms

    pre = preprocessing or default_preprocessing(image_size)
    normalise = [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    if train:
        return transforms.Compose([
            transforms.RandomRotation(45), transforms.CenterCrop(image_size),
            transforms.RandomVerticalFlip(0.5), transforms.RandomHorizontalFlip(0.5),
            transforms.ColorJitter(brightness=0.2, contrast=0.1, saturation=0.1, hue=0.1),
            transforms.RandomGrayscale(0.025), *normalise])
    filter_ = transforms.InterpolationMode(pre.interpolation)
    return transforms.Compose([transforms.Resize(pre.resize, interpolation=filter_),
                               transforms.CenterCrop(pre.crop), *normalise])


# --------------------------------------------------------------------------------------------
# On the device


@lru_cache(maxsize=16)
def _normaliser(device: torch.device, mean: tuple[float, ...],
                std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh tensor per batch would be a blocking host-to-device copy.
    shape = (-1, 1, 1)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))


def prepare_batch(images: torch.Tensor, device: torch.device | str, *,
                  channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """A batch on `device`, ready for the model.

    uint8 batches (the cache presets) cross to the device as bytes, a quarter of float32's
    traffic, and become float32 there: /255 then (x - mean) / std, the same arithmetic as
    ToTensor + Normalize. Float batches (the tutorial preset) are already normalised.
    """
    device = torch.device(device)
    # Copy first, convert the layout on the device: a host-side transpose would be slow and
    # would leave pinned memory, making the copy synchronous. uint8 moves 1 byte per value.
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype != torch.uint8:
        return images
    shift, scale = _normaliser(device, tuple(map(float, mean)), tuple(map(float, std)))
    return images.float().div_(255).sub_(shift).div_(scale)


def normalising(preprocessing: Preprocessing | None) -> dict[str, tuple[float, ...]]:
    """`prepare_batch`'s mean and std keywords for a model's preprocessing (None: its
    defaults, ImageNet's)."""
    if preprocessing is None:
        return {}
    return {"mean": preprocessing.mean, "std": preprocessing.std}
