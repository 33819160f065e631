"""`flowerml retrain`'s options as the retrain flow's parameters: the demo preset filling the
gaps, a float type that refuses nan and inf, and the flow's own validation, whose refusal is one
line naming the option the user typed (as `flowerml train` names it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flowerml.cli import CliError
from flowerml.core.recipes import option_name
from flowerml.settings import Settings

if TYPE_CHECKING:
    from pydantic import ValidationError

DEMO_SPEC = {"classes": 10, "per_class": 30, "image_size": 96, "seed": 0}
DEMO_THRESHOLD = 0.7
# The demo's checkpoint (ResNet-18 and AdamW's moments, 134 MB) after every epoch was ~7 of its
# ~50 s on 2 cores; every fifth epoch (and the last) keeps it resumable for a fraction.
DEMO_CHECKPOINT_EVERY = 5

# How the flow's parameter fields are spelled on the command line.
PARAMETER_OPTIONS = {("gate", "threshold"): "--threshold", ("gate", "tolerance"): "--tolerance",
                     ("gate", "class_drop"): "--class-drop",
                     ("gate", "force"): "--force", ("source",): "--source",
                     ("dataset",): "--dataset", ("store",): "--store",
                     ("model_name",): "--model-name", ("alias",): "--alias"}
BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
          "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}


def demo_source_folder(cache_dir: Path) -> Path:
    return cache_dir / "demo-source"


def demo_source(cache_dir: Path) -> Path:
    """The demo's synthetic archive, written once into the cache."""
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    folder = demo_source_folder(cache_dir)
    if not (folder / "setid.mat").is_file():
        write_synthetic_archive(folder, SyntheticSpec(**DEMO_SPEC), force=True)
    return folder


def retrain_params(preset: str | None, source: str | None, store: str | None,
                   dataset: str | None, gate: dict[str, Any], model_name: str, alias: str,
                   cache_dir: Path, training: dict[str, Any]) -> dict[str, Any]:
    """The flow's parameters from the command line, the demo preset filling the gaps (its
    source is the folder `demo_source` writes, named here before anything is written)."""
    training = {k: v for k, v in training.items() if v is not None}
    gate = {k: v for k, v in gate.items() if v is not None}
    if preset == "demo":
        source = source or str(demo_source_folder(cache_dir))
        training = {"recipe": "demo", "checkpoint_every": DEMO_CHECKPOINT_EVERY, **training}
        gate = {"threshold": DEMO_THRESHOLD, **gate}
    params: dict[str, Any] = {"source": source or "official", "training": training,
                              "gate": gate, "model_name": model_name, "alias": alias}
    if store:
        params["store"] = store
    if dataset:
        params["dataset"] = dataset
    return params


class FiniteFloat(click.ParamType):
    """A float that is a number: click's FLOAT takes "nan" and "inf", which every bound
    check then lets through or misreports."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        option = param.opts[0] if param else "value"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CliError(f"{option} must be a number: got {value!r}") from None
        if not math.isfinite(number):
            raise CliError(f"{option} must be a finite number: got {value!r}")
        return number


def describe_option_error(error: ValidationError) -> str:
    """A refusal of the flow's parameters (a pydantic ValidationError) as one line naming the
    option the user typed, the way `flowerml train` names it."""
    first = error.errors(include_url=False)[0]
    loc = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return message  # the training config's own check: it names the option already
    # A field's own location may end in the name of its type ("constrained-int").
    option = PARAMETER_OPTIONS.get(loc[:2]) or PARAMETER_OPTIONS.get(loc[:1]) or (
        option_name(loc[1]) if loc[:1] == ("training",) and len(loc) > 1
        else "retrain parameter " + ".".join(loc))
    value = first.get("input")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{option} must be a finite number (got {value})"
    bound = BOUNDS.get(first["type"])
    if bound:
        return f"{option} must be {bound[1]} {first['ctx'][bound[0]]:g} (got {value!r})"
    return f"{option}: {message} (got {value!r})"


def validated_params(settings: Settings, preset: str | None, source: str | None,
                     store: str | None, dataset: str | None, gate: dict[str, Any],
                     model_name: str, alias: str, training: dict[str, Any]) -> Any:
    """The flow's parameters, validated as the flow validates them: the training part builds
    the `TrainConfig` through the recipe exactly as the training child receives it."""
    from pydantic import ValidationError

    from flows.retrain import RetrainParams  # Prefect: imported once the options parse

    try:
        return RetrainParams.model_validate(retrain_params(
            preset, source, store, dataset, gate, model_name, alias, settings.cache_dir,
            training))
    except ValidationError as error:
        raise CliError(describe_option_error(error)) from None
