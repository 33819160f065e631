"""flowerml.core.recipes: the named recipes, explicit options on top, and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import get_args

import pytest
from pydantic import ValidationError

from flowerml.core import recipes
from flowerml.core.errors import UserError
from flowerml.core.recipes import (
    ARCHS,
    RECIPE_NAMES,
    RECIPES,
    STAGES,
    TrainConfig,
    TrainOverrides,
    build_config,
    load_config,
    option_name,
)

# --- the named recipes ---------------------------------------------------------------------


def test_every_named_recipe_is_listed_once():
    assert tuple(RECIPES) == RECIPE_NAMES == ("default", "tutorial", "linear-probe", "demo")


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_each_recipe_builds_a_valid_config_with_its_values(name: str):
    config = build_config(name)

    assert isinstance(config, TrainConfig)
    for field, value in RECIPES[name].items():
        assert getattr(config, field) == value, field
    # Fields the recipe leaves alone keep TrainConfig's defaults.
    for field, info in TrainConfig.model_fields.items():
        if field not in RECIPES[name]:
            assert getattr(config, field) == info.default, field
    # What the child process receives reads back as the same config.
    assert load_config(json.dumps(config.to_json())) == config


def test_recipes_differ_where_they_say_they_do():
    default, tutorial = build_config("default"), build_config("tutorial")
    probe, demo = build_config("linear-probe"), build_config("demo")
    assert (default.optimizer, default.lr, default.backbone_lr_factor) == ("sgd", 0.01, 0.1)
    assert (tutorial.optimizer, tutorial.lr, tutorial.epochs, tutorial.batch_size) == (
        "adam", 1e-3, 40, 48)
    assert tutorial.amp is False and tutorial.augment == "tutorial"
    assert probe.strategy == "linear-probe" and default.strategy == "finetune"
    assert (demo.arch, demo.weights, demo.image_size) == ("resnet18", "none", 64)


def test_build_config_defaults_to_the_default_recipe():
    assert build_config() == build_config("default") == TrainConfig()


def test_unknown_recipe_names_the_choices():
    with pytest.raises(UserError) as err:
        build_config("fast")
    assert str(err.value) == (
        "--recipe must be one of default, tutorial, linear-probe, demo: got 'fast'")


# --- explicit options on top ---------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_explicit_options_override_the_recipe(name: str):
    config = build_config(name, epochs=3, batch_size=7, lr=0.5, arch="vgg16", amp=False)

    assert (config.epochs, config.batch_size, config.lr, config.arch, config.amp) == (
        3, 7, 0.5, "vgg16", False)
    # The recipe's other values stay.
    untouched = {k: v for k, v in RECIPES[name].items()
                 if k not in {"epochs", "batch_size", "lr", "arch", "amp", "warmup_epochs"}}
    for field, value in untouched.items():
        assert getattr(config, field) == value, field


def test_none_means_unset_and_keeps_the_recipe_value():
    config = build_config("tutorial", lr=None, epochs=None, batch_size=None)
    assert (config.lr, config.epochs, config.batch_size) == (1e-3, 40, 48)


def test_an_override_can_turn_a_recipe_flag_off_or_to_zero():
    # False and 0 are values, not "unset".
    config = build_config("default", amp=False, patience=0, weight_decay=0.0)
    assert (config.amp, config.patience, config.weight_decay) == (False, 0, 0.0)


@pytest.mark.parametrize("weights", ["none", "None", " none "])
@pytest.mark.parametrize("name", ["default", "linear-probe"])
def test_random_weights_train_the_backbone_at_the_full_rate(name: str, weights: str):
    # The recipe's backbone_lr_factor 0.1 is meant for pretrained features.
    assert build_config(name).backbone_lr_factor == 0.1
    assert build_config(name, weights=weights).backbone_lr_factor == 1.0
    form = TrainOverrides(recipe=name, weights=weights)
    assert form.config().backbone_lr_factor == 1.0


def test_an_explicit_backbone_lr_factor_holds_without_pretrained_weights():
    assert build_config("default", weights="none", backbone_lr_factor=0.1).backbone_lr_factor \
        == 0.1
    assert build_config("default", weights="none", backbone_lr_factor=None).backbone_lr_factor \
        == 1.0  # None is unset
    assert TrainOverrides(weights="none", backbone_lr_factor=0.5).config().backbone_lr_factor \
        == 0.5
    # Pretrained weights keep the recipe's factor; the recipes' own factors stay as they are.
    assert build_config("default", weights="/tmp/w.pth").backbone_lr_factor == 0.1
    assert build_config("demo").backbone_lr_factor == 1.0
    assert build_config("tutorial", weights="none").backbone_lr_factor == 1.0


def test_train_help_lists_the_optimiser_options():
    from tests.helpers.cli import invoke

    result = invoke("train", "--help")
    assert result.exit_code == 0, result.output
    for option in ("--backbone-lr-factor", "--momentum", "--weight-decay", "--warmup-epochs",
                   "--schedule", "--weights"):
        assert option in result.output, option
    assert "[cosine|constant]" in result.output


def test_config_is_frozen():
    config = build_config("demo")
    with pytest.raises(ValidationError):
        config.epochs = 99  # type: ignore[misc]


# --- the one-line errors -------------------------------------------------------------------


def _message(**options: object) -> str:
    with pytest.raises(UserError) as err:
        build_config("default", **options)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_batch_size_out_of_range():
    assert _message(batch_size=0) == "--batch-size must be between 1 and 4096 (got 0)"
    assert _message(batch_size=4097) == "--batch-size must be between 1 and 4096 (got 4097)"


def test_float_bounds_are_named_as_numbers():
    assert _message(lr=0.0) == "--lr must be between 1e-07 and 10 (got 0)"
    assert _message(label_smoothing=0.6) == "--label-smoothing must be between 0 and 0.5 (got 0.6)"


def test_arch_must_be_a_known_backbone():
    assert _message(arch="resnet9") == (
        "--arch must be one of resnet18, resnet34, resnet50, resnet101, resnet152, alexnet, "
        "vgg16, vgg19, mobilenet_v3_large, mobilenet_v3_small, efficientnet_b0: got 'resnet9'")


def test_other_choices_name_their_option():
    assert _message(optimizer="rmsprop") == "--optimizer must be one of adam, adamw, sgd: got 'rmsprop'"
    assert _message(strategy="lora") == (
        "--strategy must be one of finetune, linear-probe: got 'lora'")


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_stages_is_bounded_per_arch(arch: str):
    limit = STAGES[arch]
    assert build_config("default", arch=arch, freeze_stages=limit).freeze_stages == limit
    # The arch's own limit answers (the field has no fixed upper bound of its own).
    expected = f"--freeze-stages must be between 0 and {limit} for {arch} (got {limit + 1})"
    assert _message(arch=arch, freeze_stages=limit + 1) == expected
    assert _message(arch=arch, freeze_stages=9) == expected.replace(f"(got {limit + 1})",
                                                                    "(got 9)")
    assert _message(arch=arch, freeze_stages=-1) == "--freeze-stages must be at least 0 (got -1)"


def test_warmup_cannot_exceed_the_epochs():
    assert _message(epochs=2, warmup_epochs=3) == "--warmup-epochs must be between 0 and 2 (got 3)"
    assert build_config("default", epochs=2, warmup_epochs=2).warmup_epochs == 2


def test_wrong_types_and_unknown_options():
    assert _message(epochs="ten").startswith("--epochs: Input should be a valid integer")
    assert _message(epochs="ten").endswith("(got 'ten')")
    assert _message(bogus=1) == "unknown training option 'bogus'"
    assert _message(weights="").startswith("--weights: ")


def test_load_config_names_the_child_input():
    with pytest.raises(UserError) as err:
        load_config(json.dumps({"epochs": 0}))
    assert str(err.value) == "training config: --epochs must be between 1 and 1000 (got 0)"

    with pytest.raises(UserError) as err:
        load_config("{not json")
    message = str(err.value)
    assert message.startswith("training config: Invalid JSON")
    assert "--:" not in message and "{not json" not in message


def test_option_name_is_the_cli_spelling():
    assert option_name("batch_size") == "--batch-size"
    assert option_name("lr") == "--lr"


# --- STAGES and models agree ---------------------------------------------------------------


def test_stages_cover_every_arch_and_match_the_models():
    from flowerml.models.backbones import num_stages

    assert set(STAGES) == set(ARCHS) == set(get_args(recipes.Arch))
    assert {arch: num_stages(arch) for arch in ARCHS} == STAGES


# --- the form's view -----------------------------------------------------------------------


def test_overrides_have_the_recipe_then_the_same_fields_each_optional():
    # the form starts with the recipe; "Empty" because a form field left empty means unset
    assert list(TrainOverrides.model_fields) == ["recipe", *TrainConfig.model_fields]
    assert TrainOverrides().recipe == "default"
    for name, info in TrainConfig.model_fields.items():
        override = TrainOverrides.model_fields[name]
        assert not override.is_required() and override.default is None, name
        assert override.title == info.title, name
        assert "Empty: the recipe's value." in (override.description or ""), name
    assert all(value is None for name, value in TrainOverrides().model_dump().items()
               if name != "recipe")


def test_overrides_keep_the_choices_and_bounds():
    assert TrainOverrides(batch_size=16, arch="vgg19").batch_size == 16
    with pytest.raises(ValidationError):
        TrainOverrides(batch_size=0)
    with pytest.raises(ValidationError):
        TrainOverrides(arch="resnet9")


def test_overrides_from_a_form_build_the_recipe_with_them():
    form = TrainOverrides(recipe="tutorial", epochs=4, lr=0.25)
    config = form.config()
    assert (config.epochs, config.lr, config.optimizer) == (4, 0.25, "adam")
    assert config == build_config("tutorial", epochs=4, lr=0.25)


def test_a_combination_the_recipe_cannot_take_is_refused_by_the_form():
    with pytest.raises(ValidationError, match="--freeze-stages must be between 0 and 4 for alexnet"):
        TrainOverrides(arch="alexnet", freeze_stages=5)


def test_the_form_schema_has_no_null_branches_and_booleans_can_stay_empty():
    schema = TrainOverrides.model_json_schema()["properties"]
    assert "anyOf" not in str(schema)
    assert schema["amp"]["enum"] == [True, False] and "default" not in schema["amp"]
    assert schema["epochs"] == {"title": "Epochs", "type": "integer", "minimum": 1,
                                "maximum": 1000, "description": "Training epochs (early "
                                "stopping may end sooner). Empty: the recipe's value."}


# --- no torch --------------------------------------------------------------------------------


def test_importing_recipes_does_not_import_torch():
    code = ("import sys, flowerml.core.recipes; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "flowerml.core.recipes.build_config('demo')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
