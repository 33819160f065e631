"""flowerml.data.transforms: the presets, the hand-written uint8 ops, and prepare_batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from flowerml.core.errors import DataError
from flowerml.data.preprocessing import Preprocessing
from flowerml.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelsLastResizedCrop,
    FusedColorJitter,
    build_transforms,
    prepare_batch,
)

# Small images keep the suite fast: a 32 px crop from a round(32 * 256 / 224) = 37 px cache.
SIZE = 32
RESOLUTION = 37


# --------------------------------------------------------------------------------------------
# Presets


def test_tutorial_preset_is_the_tutorials_train_transform() -> None:
    steps = build_transforms("tutorial", 224, train=True).transforms
    assert [type(s) for s in steps] == [
        transforms.RandomRotation, transforms.CenterCrop, transforms.RandomVerticalFlip,
        transforms.RandomHorizontalFlip, transforms.ColorJitter, transforms.RandomGrayscale,
        transforms.ToTensor, transforms.Normalize]
    rotation, crop, vflip, hflip, jitter, grayscale, _, normalize = steps
    assert rotation.degrees == [-45.0, 45.0]
    assert crop.size == (224, 224)
    assert vflip.p == 0.5 and hflip.p == 0.5
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.8, 1.2), (0.9, 1.1), (0.9, 1.1), (-0.1, 0.1))
    assert grayscale.p == 0.025
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


def test_tutorial_preset_eval_transform() -> None:
    steps = build_transforms("tutorial", 224, train=False).transforms
    assert [type(s) for s in steps] == [transforms.Resize, transforms.CenterCrop,
                                        transforms.ToTensor, transforms.Normalize]
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    image = Image.new("RGB", (500, 375), (200, 40, 90))
    assert build_transforms("tutorial", 224, train=False)(image).shape == (3, 224, 224)
    assert build_transforms("tutorial", 192, train=True).transforms[1].size == (192, 192)


def test_tutorial_preset_evaluates_at_the_models_preprocessing() -> None:
    """The tutorial preset's eval resize, filter and normalisation are the model's (its
    weights' own: 232 bicubic here), not a fixed Resize(256)."""
    own = Preprocessing(232, 224, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25),
                        interpolation="bicubic")
    resize, crop, _, normalize = build_transforms("tutorial", 224, train=False,
                                                  preprocessing=own).transforms
    assert (resize.size, resize.interpolation) == (232, transforms.InterpolationMode.BICUBIC)
    assert crop.size == (224, 224)
    assert (tuple(normalize.mean), tuple(normalize.std)) == (own.mean, own.std)
    train_normalize = build_transforms("tutorial", 224, train=True,
                                       preprocessing=own).transforms[-1]
    assert tuple(train_normalize.mean) == own.mean


@pytest.mark.parametrize("preset", ["standard", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_cache_presets_output_uint8(preset: str, train: bool) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=torch.uint8).permute(2, 0, 1)
    out = build_transforms(preset, SIZE, train=train)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)


def test_eval_and_none_presets_centre_crop() -> None:
    image = torch.arange(3 * 256 * 256, dtype=torch.int64).remainder(251).to(torch.uint8)
    image = image.reshape(3, 256, 256)
    for preset, train in (("standard", False), ("none", True), ("none", False)):
        out = build_transforms(preset, 224, train=train)(image)
        assert torch.equal(out, image[:, 16:240, 16:240])


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(DataError) as caught:
        build_transforms("fancy", train=True)
    assert str(caught.value) == "--augment must be one of standard, tutorial, none: got 'fancy'"


# --------------------------------------------------------------------------------------------
# The hand-written uint8 ops


def test_fused_color_jitter() -> None:
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    identity = FusedColorJitter(0, 0, 0, 0, p=1.0)
    assert torch.equal(identity(image), image)
    grey = torch.full((3, 8, 8), 120, dtype=torch.uint8)
    assert torch.equal(FusedColorJitter(0, 0, 0, 0.5, p=1.0)(grey), grey)  # hue keeps grey
    jittered = FusedColorJitter(0.2, 0.2, 0.2, 0.02, p=1.0)(image)
    assert jittered.dtype == torch.uint8 and jittered.shape == image.shape
    assert not torch.equal(jittered, image)
    brighter = FusedColorJitter(0.5, 0, 0, 0, p=1.0)
    brighter.affine = lambda draws, mean: ((1.5 * np.eye(3)).tolist(), [0.0] * 3)
    expected = (image.double() * 1.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    assert torch.equal(brighter(image), expected)
    assert torch.equal(FusedColorJitter(0.5, 0.5, 0.5, 0.1, p=0.0)(image), image)


def test_channels_last_resized_crop_matches_torchvision() -> None:
    torch.manual_seed(3)
    image = torch.randint(0, 256, (64, 80, 3), dtype=torch.uint8).permute(2, 0, 1)  # like the cache
    crop = ChannelsLastResizedCrop(SIZE, scale=(0.25, 1.0), antialias=True)
    params = {"top": 5, "left": 9, "height": 40, "width": 50}
    out = crop.transform(image, params)
    assert out.is_contiguous() and out.shape == (3, SIZE, SIZE)
    assert torch.equal(out, TF.resized_crop(image, **params, size=[SIZE, SIZE], antialias=True))


@pytest.mark.parametrize(("amounts", "draws", "reference"), [
    ((0.2, 0, 0, 0), [1.0, 0.5, 0.5, 0.5], lambda img: TF.adjust_brightness(img, 1.2)),
    ((0.2, 0, 0, 0), [0.0, 0.5, 0.5, 0.5], lambda img: TF.adjust_brightness(img, 0.8)),
    ((0, 0.2, 0, 0), [0.5, 1.0, 0.5, 0.5], lambda img: TF.adjust_contrast(img, 1.2)),
    ((0, 0.2, 0, 0), [0.5, 0.0, 0.5, 0.5], lambda img: TF.adjust_contrast(img, 0.8)),
    ((0, 0, 0.2, 0), [0.5, 0.5, 1.0, 0.5], lambda img: TF.adjust_saturation(img, 1.2)),
    ((0, 0, 0.2, 0), [0.5, 0.5, 0.0, 0.5], lambda img: TF.adjust_saturation(img, 0.8)),
])
def test_fused_color_jitter_matches_torchvision_factors(amounts, draws, reference) -> None:
    torch.manual_seed(4)
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    out = FusedColorJitter(*amounts, p=1.0).apply(image, draws)
    difference = (out.int() - reference(image).int()).abs().max()
    assert difference <= 2  # torchvision truncates, and rounds its grey image to uint8


def test_fused_color_jitter_hue_is_small() -> None:
    image = torch.zeros((3, 4, 4), dtype=torch.uint8)
    image[0] = 200  # pure red
    out = FusedColorJitter(0, 0, 0, 0.02, p=1.0).apply(image, [0.5, 0.5, 0.5, 1.0])
    red, green, blue = out[:, 0, 0].tolist()
    assert red > 180 and green < 30 and blue < 30 and (green, blue) != (0, 0)


# --------------------------------------------------------------------------------------------
# prepare_batch


def test_prepare_batch_equals_totensor_normalize() -> None:
    torch.manual_seed(2)
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(Image.fromarray(img.permute(1, 2, 0).numpy()))
                            for img in batch])
    out = prepare_batch(batch, "cpu")
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    last = prepare_batch(batch, torch.device("cpu"), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(last, expected, atol=1e-6, rtol=0)


def test_prepare_batch_passes_float_through() -> None:
    batch = torch.randn(2, 3, 8, 8)
    assert torch.equal(prepare_batch(batch, "cpu"), batch)
