"""Backbones with a fresh classification head, loading their weights, and how to train them.

This module owns three things:
- the architectures (`ARCHS`): torchvision's ResNet-18/34/50/101/152, AlexNet, VGG-16/19 and
  the mobile MobileNetV3-Large, MobileNetV3-Small and EfficientNet-B0 (students for
  `flowerml distill`; the small one also keeps the tests' deployment runs light), cut
  before their ImageNet classifier into a `backbone` that outputs `[N, feature_dim]`, followed
  by a new `head` (`nn.Linear(feature_dim, num_classes)`);
- loading a state dict into the backbone, strictly (`build_model(weights=...)` takes weights
  already resolved to a verified local file by `flowerml.models.weights`: where they come from, S3
  included, is not this module's business);
- the transfer strategies (`STRATEGIES`): `finetune` (optionally freezing the first stages)
  and `linear-probe` (the whole backbone frozen), with the optimiser's parameter groups.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any, Protocol, get_args

import torch
import torchvision
from torch import Tensor, nn

from flowerml.core.errors import UserError
from flowerml.core.recipes import Arch, Strategy


class WeightsSource(Protocol):
    """Weights resolved to a verified local file (`flowerml.models.weights.ResolvedWeights`): how they
    are named, and their state dict (None for random init). A protocol, so that this module
    needs nothing of the one that resolves them."""

    source: str

    def state_dict(self) -> Mapping[str, Any] | None: ...


# The choices are TrainConfig's (flowerml/core/recipes.py), the one place they are declared.
ARCHS: tuple[str, ...] = get_args(Arch)
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# Mobile architectures downsample with strided convolutions, not pooling: their stages are cut
# where the resolution halves (see `backbone_stages`).
MOBILE_ARCHS = ("mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0")
RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm)


class ModelError(UserError):
    """A bad model option: unknown arch or strategy, freeze range, or weights that do not fit."""


class FlowerModel(nn.Module):
    """backbone (pretrained feature extractor, outputs [N, feature_dim]) + head (a fresh
    nn.Linear(feature_dim, num_classes)).

    `frozen_stages` is how many leading backbone stages `freeze_stages` locked; `train()`
    keeps those in eval mode, so a frozen stage is a fixed function (BatchNorm uses its
    running statistics and does not update them; Dropout is off).
    """

    def __init__(self, arch: str, backbone: nn.Module, feature_dim: int,
                 num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.frozen_stages = 0
        self.weights_source = "none"

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def train(self, mode: bool = True) -> FlowerModel:
        super().train(mode)
        if mode:
            for module in frozen_modules(self):
                module.eval()
        return self


# --------------------------------------------------------------------------------------------
# Architectures


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ModelError(f"--arch must be one of {', '.join(ARCHS)}: got {arch!r}")
    return arch


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ModelError(f"--strategy must be one of {', '.join(STRATEGIES)}: got {strategy!r}")
    return strategy


def is_resnet(arch: str) -> bool:
    return arch.startswith("resnet")


def is_mobile(arch: str) -> bool:
    return arch in MOBILE_ARCHS


def torchvision_model(arch: str) -> nn.Module:
    """The torchvision model of that name, randomly initialised (weights come later)."""
    return torchvision.models.get_model(check_arch(arch), weights=None)


def split_torchvision_model(arch: str, source: nn.Module) -> tuple[nn.Sequential, int]:
    """(backbone, feature_dim): the model minus its final ImageNet classifier layer.

    Children keep their torchvision names, so `backbone.state_dict()` has exactly the keys of
    the torchvision state dict without the classifier (e.g. "layer1.0.conv1.weight").
    """
    if is_resnet(arch):
        parts = OrderedDict((name, getattr(source, name))
                            for name in (*RESNET_STEM, *RESNET_LAYERS, "avgpool"))
        parts["flatten"] = nn.Flatten(1)
        return nn.Sequential(parts), source.fc.in_features
    classifier = source.classifier
    parts = OrderedDict(features=source.features, avgpool=source.avgpool,
                        flatten=nn.Flatten(1), classifier=classifier[:-1])
    return nn.Sequential(parts), classifier[-1].in_features


def dropped_classifier_prefix(arch: str) -> str:
    """The state-dict prefix of the ImageNet classifier the fresh head replaces."""
    if is_resnet(arch):
        return "fc."
    return f"classifier.{len(meta_model(arch).classifier) - 1}."


@cache
def meta_model(arch: str) -> nn.Module:
    """A parameter-less instance (meta device) for reading an arch's structure cheaply."""
    with torch.device("meta"):
        return torchvision_model(arch)


# --------------------------------------------------------------------------------------------
# Building


def build_model(arch: str, num_classes: int, *, weights: WeightsSource | None = None,
                seed: int | None = None) -> FlowerModel:
    """A FlowerModel for `arch` with `num_classes` outputs, its backbone loaded from `weights`.

    `weights` comes from `flowerml.models.weights.resolve_weights` (None: random init). The head is
    always freshly initialised; with `seed` the initialisation is reproducible and leaves the
    global RNG untouched.
    """
    check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer: got {num_classes!r}")
    if isinstance(weights, str):
        raise TypeError("build_model takes resolved weights: call "
                        f"flowerml.models.weights.resolve_weights({weights!r}, {arch!r}) first")
    model = _construct(arch, int(num_classes), seed)
    state = weights.state_dict() if weights is not None else None
    if state is not None:
        load_backbone_state(model, state, weights.source)
        model.weights_source = weights.source
    return model


def _construct(arch: str, num_classes: int, seed: int | None) -> FlowerModel:
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        backbone, feature_dim = split_torchvision_model(arch, torchvision_model(arch))
        return FlowerModel(arch, backbone, feature_dim, num_classes)


# --------------------------------------------------------------------------------------------
# Loading a state dict into the backbone


def load_backbone_state(model: FlowerModel, state: Mapping[str, Any], source: str) -> None:
    """Copy a torchvision (or FlowerModel) state dict into `model.backbone`, strictly.

    Accepts {"state_dict": ...} / {"model": ...} wrappers, DDP's "module." prefix, and
    FlowerModel's own "backbone.*" keys. The ImageNet classifier (and a saved head) is ignored:
    the head stays fresh. Any missing, extra or mis-shaped backbone key is a ModelError, since
    a partial load would quietly train from half-random features.
    """
    state = _unwrap(state)
    wanted = model.backbone.state_dict()
    mapped, unexpected, names = _map_keys(state, model.arch, wanted)
    for key, target in wanted.items():
        _check_tensor(key, target, mapped, names, source, model.arch)
    if unexpected:
        raise ModelError(f"--weights {source} does not fit {model.arch}: unexpected key "
                         f"{unexpected[0]!r} (weights for another architecture?)")
    complete = {key: mapped.get(key, target) for key, target in wanted.items()}
    model.backbone.load_state_dict(complete, strict=True)


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}} from a training checkpoint
        inner = next((state[k] for k in ("state_dict", "model")
                      if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _map_keys(state: Mapping[str, Any], arch: str, wanted: Mapping[str, Tensor]
              ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """(backbone key -> value, the file's unexpected keys, backbone key -> the file's key)."""
    ours = any(isinstance(k, str) and k.startswith("backbone.") for k in state)
    prefix, dropped = ("backbone.", "head.") if ours else ("", dropped_classifier_prefix(arch))
    mapped: dict[str, Any] = {}
    unexpected: list[str] = []
    names: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            unexpected.append(repr(key))
            continue
        if key.startswith(dropped):
            continue
        target = key.removeprefix(prefix)
        if not key.startswith(prefix) or target not in wanted:
            unexpected.append(key)
            continue
        mapped[target] = value
        names[target] = key
    return mapped, unexpected, names


def _check_tensor(key: str, target: Tensor, mapped: Mapping[str, Any], names: Mapping[str, str],
                  source: str, arch: str) -> None:
    if key not in mapped:
        # Checkpoints older than BatchNorm's counter lack it; torch fills it in the same way.
        if key.endswith("num_batches_tracked"):
            return
        raise ModelError(f"--weights {source} does not fit {arch}: missing key {key!r}")
    value = mapped[key]
    name = names[key]
    if not isinstance(value, Tensor):
        raise ModelError(f"--weights {source}: key {name!r} holds a {type(value).__name__}, "
                         "not a tensor")
    if value.shape != target.shape:
        raise ModelError(f"--weights {source} does not fit {arch}: key {name!r} has shape "
                         f"{list(value.shape)}, {arch} needs {list(target.shape)}")


# --------------------------------------------------------------------------------------------
# Transfer strategies


def backbone_stages(model: FlowerModel) -> list[list[nn.Module]]:
    """The backbone's stages in input order, the unit that `freeze_stages` locks.

    ResNet: 0 = stem (conv1, bn1, relu, maxpool), 1..4 = layer1..layer4. AlexNet/VGG: one
    stage per convolutional block of `features` (each ending at its MaxPool2d), then the
    kept classifier layers as the last stage. MobileNetV3/EfficientNet: one stage per
    resolution of `features` (a new one at each block that downsamples), then the kept
    classifier layers when they have weights (MobileNetV3's 960 -> 1280 layer; EfficientNet
    keeps only a Dropout).
    """
    backbone = model.backbone
    if is_resnet(model.arch):
        stem = [getattr(backbone, name) for name in RESNET_STEM]
        return [stem, *([getattr(backbone, name)] for name in RESNET_LAYERS)]
    if is_mobile(model.arch):
        return _mobile_stages(backbone.features, backbone.classifier)
    return [*_conv_blocks(backbone.features), [backbone.classifier]]


def _conv_blocks(features: nn.Sequential) -> list[list[nn.Module]]:
    blocks: list[list[nn.Module]] = [[]]
    for layer in features:
        blocks[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
    if not blocks[-1]:
        blocks.pop()
    return blocks


def _mobile_stages(features: nn.Sequential, kept_classifier: nn.Module) -> list[list[nn.Module]]:
    tail = [[kept_classifier]] if any(True for _ in kept_classifier.parameters()) else []
    return [*_resolution_blocks(features), *tail]


def _resolution_blocks(features: nn.Sequential) -> list[list[nn.Module]]:
    blocks: list[list[nn.Module]] = []
    for layer in features:
        if not blocks or _downsamples(layer):
            blocks.append([])
        blocks[-1].append(layer)
    return blocks


def _downsamples(layer: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in layer.modules())


@cache
def num_stages(arch: str) -> int:
    """How many stages `freeze_stages` can lock for `arch` (5 for ResNets)."""
    check_arch(arch)
    if is_resnet(arch):
        return 1 + len(RESNET_LAYERS)
    if is_mobile(arch):
        meta = meta_model(arch)
        return len(_mobile_stages(meta.features, meta.classifier[:-1]))
    return len(_conv_blocks(meta_model(arch).features)) + 1


def frozen_modules(model: FlowerModel) -> Iterator[nn.Module]:
    for stage in backbone_stages(model)[:model.frozen_stages]:
        yield from stage


def freeze_stages(model: FlowerModel, stages: int) -> None:
    """Freeze exactly the first `stages` backbone stages; the rest and the head train.

    Frozen parameters get requires_grad False and their modules stay in eval mode (see
    FlowerModel.train). Calling it again with a smaller number unfreezes the later stages.
    """
    all_stages = backbone_stages(model)
    if isinstance(stages, bool) or not isinstance(stages, int) \
            or not 0 <= stages <= len(all_stages):
        raise ModelError(f"--freeze-stages must be between 0 and {len(all_stages)} for "
                         f"{model.arch}: got {stages!r}")
    for index, stage in enumerate(all_stages):
        for module in stage:
            module.requires_grad_(index >= stages)
    model.head.requires_grad_(True)
    model.frozen_stages = stages
    model.train(model.training)  # re-apply the mode so newly (un)frozen BN layers follow


def prepare_for_strategy(model: FlowerModel, strategy: str, freeze: int = 0) -> None:
    """Apply a strategy's freezing: finetune locks the first `freeze` stages, linear-probe all."""
    check_strategy(strategy)
    if strategy == "finetune":
        freeze_stages(model, freeze)
        return
    everything = num_stages(model.arch)
    if freeze not in (0, everything):
        raise ModelError(f"--freeze-stages does not apply to --strategy linear-probe, which "
                         f"freezes the whole backbone: got {freeze!r}")
    freeze_stages(model, everything)


def parameter_groups(model: FlowerModel, *, strategy: str, lr: float,
                     backbone_lr_factor: float = 0.1,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, each with a "name"; frozen parameters are left out.

    finetune: backbone at lr * backbone_lr_factor (pretrained features need smaller steps than
    a new head), head at lr. linear-probe: freezes the whole backbone, head only. Biases and
    normalisation parameters go to "*_no_decay" groups: decaying them towards zero only
    shifts activations and fights BatchNorm's scale.
    """
    check_strategy(strategy)
    if not lr > 0:
        raise ModelError(f"--lr must be positive: got {lr!r}")
    if not backbone_lr_factor >= 0:
        raise ModelError(f"--backbone-lr-factor must be >= 0: got {backbone_lr_factor!r}")
    if not weight_decay >= 0:
        raise ModelError(f"--weight-decay must be >= 0: got {weight_decay!r}")
    if strategy == "linear-probe":
        prepare_for_strategy(model, strategy)
    parts = [("head", model.head, lr)]
    if strategy == "finetune":
        parts.insert(0, ("backbone", model.backbone, lr * backbone_lr_factor))
    groups = []
    for name, module, part_lr in parts:
        decay, no_decay = _split_decay(module)
        for group_name, params, group_decay in ((name, decay, weight_decay),
                                                (f"{name}_no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": group_name, "params": params, "lr": part_lr,
                               "weight_decay": group_decay})
    return groups


def _split_decay(root: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trainable params to decay, trainable biases and norm params) under `root`."""
    decay, no_decay = [], []
    for module in root.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay
