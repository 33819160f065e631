"""Training recipes and the one typed `TrainConfig`: its choices, bounds and descriptions.

`TrainConfig` is the single source of the training options: the `flowerml train` options (with
their choices and help), the retrain flow's form (`TrainOverrides`, the same fields, each
optional) and the child process's input (`TrainConfig` as JSON) are all derived from it, and it
is validated once, here. This module imports neither torch nor the data code, so computing a
flow-run name or rendering `--help` stays fast.

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

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.json_schema import SkipJsonSchema

from flowerml.core.errors import UserError

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet", "vgg16",
               "vgg19", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0"]
# What `flowerml distill --student` accepts: the small and mobile members of Arch.
StudentArch = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small",
                      "efficientnet_b0"]
Strategy = Literal["finetune", "linear-probe"]
Augment = Literal["standard", "tutorial", "none"]
Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["cosine", "constant"]
RecipeName = Literal["default", "tutorial", "linear-probe", "demo"]
Device = Literal["auto", "cpu", "cuda"]

ARCHS: tuple[str, ...] = get_args(Arch)
STUDENT_ARCHS: tuple[str, ...] = get_args(StudentArch)
RECIPE_NAMES: tuple[str, ...] = get_args(RecipeName)
# How many backbone stages `freeze_stages` can lock per arch (tests check it against models.py).
STAGES: dict[str, int] = {"resnet18": 5, "resnet34": 5, "resnet50": 5, "resnet101": 5,
                          "resnet152": 5, "alexnet": 4, "vgg16": 6, "vgg19": 6,
                          "mobilenet_v3_large": 6, "mobilenet_v3_small": 6, "efficientnet_b0": 5}


class TrainConfig(BaseModel):
    """Everything that decides what a training run computes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch = Field("resnet152", title="Architecture",
                       description="torchvision backbone; its classifier is replaced by a "
                                   "head with one output per class of the dataset.")
    weights: str = Field("imagenet", title="Initial weights", min_length=1,
                         description="imagenet, none, a local .safetensors/.pth file or an "
                                     "s3:// URI.")
    strategy: Strategy = Field("finetune", title="Transfer strategy",
                               description="finetune trains every layer; linear-probe trains "
                                           "the head on frozen, cached features.")
    augment: Augment = Field("standard", title="Augmentation",
                             description="standard, the original tutorial's transforms, or none.")
    optimizer: Optimizer = Field("sgd", title="Optimizer")
    epochs: int = Field(30, ge=1, le=1000, title="Epochs",
                        description="Training epochs (early stopping may end sooner).")
    batch_size: int = Field(64, ge=1, le=4096, title="Batch size",
                            description="Images per step (per GPU under torchrun).")
    lr: float = Field(0.01, ge=1e-7, le=10.0, title="Learning rate",
                      description="The head's learning rate.")
    backbone_lr_factor: float = Field(0.1, ge=0.0, le=10.0, title="Backbone learning-rate factor",
                                      description="The backbone's learning rate as a fraction "
                                                  "of the head's.")
    momentum: float = Field(0.9, ge=0.0, le=0.999, title="Momentum",
                            description="SGD momentum (Nesterov).")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, title="Weight decay")
    schedule: Schedule = Field("cosine", title="Learning-rate schedule",
                               description="cosine decay after the warm-up, or constant.")
    warmup_epochs: float = Field(1.0, ge=0.0, le=1000, title="Warm-up epochs",
                                 description="Linear warm-up length (at most the epochs).")
    label_smoothing: float = Field(0.1, ge=0.0, le=0.5, title="Label smoothing")
    patience: int = Field(10, ge=0, le=1000, title="Early-stopping patience",
                          description="Epochs without a better valid top-1 before stopping "
                                      "(0: never stop early).")
    image_size: int = Field(224, ge=32, le=1024, title="Image size",
                            description="Training crop side in pixels.")
    # Its upper bound depends on the arch: the model validator names it (5 for ResNets).
    freeze_stages: int = Field(0, ge=0, title="Frozen stages",
                               description="Lock the first K backbone stages (5 for ResNets).")
    seed: int = Field(0, ge=0, le=2**31 - 1, title="Random seed")
    amp: bool = Field(True, title="Mixed precision",
                      description="bf16/fp16 autocast on CUDA, bf16 on CPUs that compute it "
                                  "natively (AVX512-BF16, AMX).")
    channels_last: bool = Field(True, title="Channels-last memory format",
                                description="On CUDA and the CPU.")
    compile: bool = Field(False, title="torch.compile", description="Compile the model on CUDA.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs must be between 0 and {self.epochs:g} "
                             f"(got {self.warmup_epochs:g})")
        if self.freeze_stages > STAGES[self.arch]:
            raise ValueError(f"--freeze-stages must be between 0 and {STAGES[self.arch]} for "
                             f"{self.arch} (got {self.freeze_stages})")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class DistillConfig(BaseModel):
    """How a student learns from its teacher (`flowerml distill`), beside its TrainConfig.

    The loss is `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)`, both
    models seeing the same augmented (and, with `mixup`, mixed) images: Hinton, Vinyals & Dean,
    "Distilling the Knowledge in a Neural Network" (2015) for the tempered KL and its T^2;
    Beyer et al., "Knowledge distillation: A good teacher is patient and consistent" (CVPR
    2022) for the consistent view and mixup.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(4.0, gt=0, le=100, title="Temperature",
                               description="Softens both models' outputs before comparing "
                                           "them (T > 0; 1 compares the plain probabilities).")
    alpha: float = Field(0.9, ge=0, le=1, title="Distillation weight",
                         description="Weight of the teacher's soft targets; 1 - alpha goes to "
                                     "the labels' cross-entropy.")
    mixup: float = Field(0.0, ge=0, le=1, title="Mixup probability",
                         description="Chance that a batch is mixed with a shuffled copy of "
                                     "itself (mixing weight uniform in [0, 1]); the teacher "
                                     "sees the same mixed images.")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def build_distill_config(**values: Any) -> DistillConfig:
    """A DistillConfig from the options that are set, or one UserError naming the option."""
    try:
        return DistillConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        raise UserError(describe_distill_error(error)) from None


def describe_distill_error(error: ValidationError) -> str:
    """The first problem as one line: `--alpha must be between 0 and 1 (got 1.5)`."""
    first = error.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    info = DistillConfig.model_fields.get(field)
    if info is None:
        return f"unknown distillation option {field!r}" if field else first["msg"]
    low, above, high = _bound(info, "ge"), _bound(info, "gt"), _bound(info, "le")
    value = first.get("input")
    if first["type"] not in ("greater_than", "greater_than_equal", "less_than_equal"):
        return f"{option_name(field)}: {first['msg']} (got {value!r})"
    if low is not None:
        return f"{option_name(field)} must be between {low:g} and {high:g} (got {value!r})"
    return f"{option_name(field)} must be greater than {above:g} and at most {high:g} " \
           f"(got {value!r})"


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


def option_name(field: str) -> str:
    """`batch_size` -> `--batch-size`: how errors name a field, as the CLI spells it."""
    return "--" + field.replace("_", "-")


def describe_error(error: ValidationError) -> str:
    """The first problem of a validation error as one line naming the option."""
    first = error.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    value = first.get("input")
    if first["type"] == "value_error":
        return first["msg"].removeprefix("Value error, ")
    if not field:
        # The input as a whole (e.g. invalid JSON): no option to name, and no input to echo.
        return first["msg"]
    if first["type"] == "literal_error":
        choices = ", ".join(get_args(TrainConfig.model_fields[field].annotation))
        return f"{option_name(field)} must be one of {choices}: got {value!r}"
    if first["type"] == "extra_forbidden":
        return f"unknown training option {field!r}"
    info = TrainConfig.model_fields.get(field)
    low, high = (_bound(info, "ge"), _bound(info, "le")) if info else (None, None)
    if isinstance(value, int | float) and not isinstance(value, bool) and low is not None:
        if high is not None:
            return f"{option_name(field)} must be between {low:g} and {high:g} (got {value:g})"
        return f"{option_name(field)} must be at least {low:g} (got {value:g})"
    return f"{option_name(field)}: {first['msg']} (got {value!r})"


def build_config(recipe: str = "default", **overrides: Any) -> TrainConfig:
    """A recipe's values with explicit options (those not None) on top, validated once.

    Without pretrained weights (`weights` none) the backbone learns at the head's rate: a
    `backbone_lr_factor` below 1 is meant for pretrained features, so it applies to random
    ones only when the recipe or an option sets it."""
    if recipe not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}: got {recipe!r}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    weights = values.get("weights", TrainConfig.model_fields["weights"].default)
    if "backbone_lr_factor" not in values and isinstance(weights, str) \
            and weights.strip().lower() == "none":
        values["backbone_lr_factor"] = 1.0
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise UserError(describe_error(error)) from None


def load_config(text: str) -> TrainConfig:
    """A `TrainConfig` from its JSON (the child process's input)."""
    try:
        return TrainConfig.model_validate_json(text)
    except ValidationError as error:
        raise UserError(f"training config: {describe_error(error)}") from None


def omit_default(schema: dict[str, Any]) -> None:
    """`json_schema_extra` for an optional form field: no `default: null` for a form to show."""
    schema.pop("default", None)


def optional_field(*, title: str, description: str) -> Any:
    """A form field that may stay empty (None: the recipe's or the worker's value decides)."""
    return Field(None, title=title, description=description, json_schema_extra=omit_default)


def _as_choice(schema: dict[str, Any]) -> None:
    # A form renders a boolean as a toggle, which is always on or off and so always overrides
    # the recipe; as a choice of true/false it can stay empty.
    schema.pop("default", None)
    schema.pop("type", None)
    schema["enum"] = [True, False]


def _optional(name: str) -> tuple[Any, Any]:
    """A TrainConfig field as an override: None (the recipe's value) is accepted in Python but
    left out of the JSON schema, so a form shows a plain dropdown or number box, empty = unset."""
    info = TrainConfig.model_fields[name]
    note = "Empty: the recipe's value."
    description = f"{info.description} {note}" if info.description else note
    constrained = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return (constrained | SkipJsonSchema[None],
            Field(None, title=info.title, description=description,
                  json_schema_extra=_as_choice if info.annotation is bool else omit_default))


def _bound(info: Any, kind: str) -> float | None:
    return next((getattr(m, kind) for m in info.metadata if getattr(m, kind, None) is not None),
                None)


class _Overrides(BaseModel):
    """Training options; each unset option takes the recipe's value."""

    @model_validator(mode="after")
    def _resolvable(self) -> _Overrides:
        try:
            self.config()  # a combination the recipe cannot take fails here, before any work
        except UserError as error:
            raise ValueError(str(error)) from None
        return self

    def config(self) -> TrainConfig:
        """The recipe with the options that are set on top, validated."""
        overrides = self.model_dump(include=set(TrainConfig.model_fields), exclude_none=True)
        return build_config(self.recipe, **overrides)


# The form's view of TrainConfig: the recipe first, then the same fields, titles, choices and
# bounds, each optional because an unset field must follow whichever recipe the user picks.
TrainOverrides = create_model(
    "TrainOverrides", __base__=_Overrides,
    recipe=(RecipeName, Field("default", title="Recipe", description=(
        "default: ImageNet ResNet-152 fine-tuned for 30 epochs; tutorial: the original "
        "notebook's run; linear-probe: a frozen backbone; demo: a small CPU run. The options "
        "below override it."))),
    **{name: _optional(name) for name in TrainConfig.model_fields})
