"""Backbones in tests: a seeded torchvision ResNet-18 (what a staged weights file would hold)
and the checks that a model carries its backbone exactly under a fresh head."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from flowerml.models.backbones import FlowerModel


def source_resnet18(seed: int = 7) -> nn.Module:
    """A torchvision resnet18 with seeded random weights: what a staged file would hold."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    # Non-default BN statistics, so buffers are really compared, not just both at init values.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def assert_backbone_equals(model: FlowerModel, source: nn.Module) -> None:
    expected = source.state_dict()
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in expected if not k.startswith("fc.")}
    for key, tensor in backbone.items():
        assert torch.equal(tensor, expected[key]), key


def assert_fresh_head(model: FlowerModel, source: nn.Module, num_classes: int) -> None:
    assert model.head.weight.shape == (num_classes, 512)
    assert not torch.equal(model.head.weight, source.fc.weight[:num_classes])


def save_pth(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path
