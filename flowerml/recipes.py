"""Training recipes: named sets of hyper-parameters, and the validated `TrainConfig`.

`default` fine-tunes every layer with SGD + Nesterov momentum, a backbone learning rate ten
times below the head's, a short warm-up and a cosine decay, label smoothing 0.1. This follows
what published fine-tuning studies found works for ImageNet ResNets on Flowers-102:
- Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?" (CVPR 2019): fine-tuning
  all layers with SGD + Nesterov momentum 0.9 and a cosine-like decay beats fixed features on
  Flowers-102 (ResNet-152 around 97% top-1 at 224 px), and label smoothing is harmless here;
- Kolesnikov et al., "Big Transfer (BiT)" (ECCV 2020), the BiT-HyperRule: SGD momentum 0.9, a
  short schedule for datasets of ~1k images, warm-up, no weight decay towards zero;
- Li et al., "Rethinking the Hyperparameters for Fine-tuning" (ICLR 2020): for a target domain
  close to ImageNet (natural photos of flowers), a smaller learning rate for the pretrained
  layers than for the new head, and momentum 0.9, are the settings that matter.
`tutorial` reproduces the original notebook's run (Adam 1e-3, 40 epochs, batch 48, its
augmentation, fp32, one learning rate for all layers) for comparison. `demo` is a small CPU run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from flowerml.data import PRESETS
from flowerml.errors import UserError
from flowerml.models import ARCHS, STRATEGIES, num_stages

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    arch: str = "resnet152"
    weights: str = "imagenet"
    strategy: str = "finetune"
    augment: str = "standard"
    optimizer: str = "sgd"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    backbone_lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 10
    image_size: int = 224
    freeze_stages: int = 0
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        check_range("--epochs", self.epochs, 1, 1000)
        check_range("--batch-size", self.batch_size, 1, 4096)
        check_range("--lr", self.lr, 1e-7, 10.0)
        check_range("--backbone-lr-factor", self.backbone_lr_factor, 0.0, 10.0)
        check_range("--momentum", self.momentum, 0.0, 0.999)
        check_range("--weight-decay", self.weight_decay, 0.0, 1.0)
        check_range("--warmup-epochs", self.warmup_epochs, 0.0, self.epochs)
        check_range("--label-smoothing", self.label_smoothing, 0.0, 0.5)
        check_range("--patience", self.patience, 0, 1000)
        check_range("--image-size", self.image_size, 32, 1024)
        check_range("--seed", self.seed, 0, 2**31 - 1)
        check_choice("--arch", self.arch, ARCHS)
        check_choice("--strategy", self.strategy, STRATEGIES)
        check_choice("--augment", self.augment, PRESETS)
        check_range("--freeze-stages", self.freeze_stages, 0, num_stages(self.arch))
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        check_choice("--schedule", self.schedule, SCHEDULES)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{option} must be between {low:g} and {high:g} (got {value:g})")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}: got {value!r}")


RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "tutorial": {
        "augment": "tutorial", "optimizer": "adam", "lr": 1e-3, "epochs": 40, "batch_size": 48,
        "backbone_lr_factor": 1.0, "weight_decay": 0.0, "schedule": "constant",
        "warmup_epochs": 0.0, "label_smoothing": 0.0, "patience": 0, "amp": False,
        "channels_last": False,
    },
    "linear-probe": {
        "strategy": "linear-probe", "optimizer": "adamw", "lr": 1e-3, "epochs": 60,
        "batch_size": 256, "weight_decay": 1e-4, "warmup_epochs": 0.0, "patience": 15,
    },
    "demo": {
        "arch": "resnet18", "weights": "none", "augment": "standard", "optimizer": "adamw",
        "lr": 2e-3, "backbone_lr_factor": 1.0, "epochs": 15, "batch_size": 32, "image_size": 64,
        "weight_decay": 1e-4, "warmup_epochs": 0.5, "patience": 0,
    },
}


def build_config(recipe: str = "default", **overrides: Any) -> TrainConfig:
    """A recipe's values with explicit options (those not None) on top."""
    check_choice("--recipe", recipe, tuple(RECIPES))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(unknown)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return replace(TrainConfig(), **values)
