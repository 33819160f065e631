"""`flowerml distill`: train a small student on a frozen teacher's outputs, and optionally
register it under its own model name and promote it on the student gate."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from flowerml.cli.app import (
    EXIT_REFUSED,
    Choice,
    CliError,
    alias_option,
    cli,
    device_option,
    emit_json,
    raise_if_stop_was_lost,
    training_options,
)
from flowerml.cli.tracking import extra_tags, mirror_registry
from flowerml.cli.training import (
    live_run,
    recipe_was_typed,
    run_reporting_options,
    run_source_options,
    say,
    workers_option,
)
from flowerml.core.documents import plain
from flowerml.core.recipes import RECIPE_NAMES, STUDENT_ARCHS, DistillConfig
from flowerml.settings import build_store, load_settings


def student_options(command: Any) -> Any:
    """`training_options` without `--arch`: a student's architecture is `--student`."""
    command = training_options(command)
    command.__click_params__ = [p for p in command.__click_params__ if p.name != "arch"]
    return command


def distill_option(name: str) -> Any:
    info = DistillConfig.model_fields[name]
    return click.option(f"--{name}", type=float, default=None,
                        help=f"{info.description} Default: {info.default:g}.")


@cli.command()
@click.option("--teacher", "teacher_ref", default=None, metavar="NAME@ALIAS|NAME:VERSION",
              help="The registry model to learn from, e.g. flowers102@production.")
@click.option("--teacher-run", default=None, metavar="ID",
              help="A training run to learn from instead of a registry model.")
@click.option("--student", type=Choice(STUDENT_ARCHS), default=None,
              help="The student's architecture (a resumed run keeps its own).")
@distill_option("temperature")
@distill_option("alpha")
@distill_option("mixup")
@run_source_options
@click.option("--recipe", type=Choice(RECIPE_NAMES), default="default", show_default=True,
              help="A named set of the options below; explicit options override it. The "
                   "image size defaults to the teacher's.")
@student_options
@click.option("--config", "config_json", default=None,
              help="The student's whole training config as JSON (its arch is the student), "
                   "instead of --student, --recipe and the options above.")
@device_option
@workers_option
@click.option("--run-id", default=None,
              help="Resume this run with its own teacher and config (a larger --epochs "
                   "extends it), or name a new one (default: a new time-stamped id).")
@click.option("--register", is_flag=True,
              help="Then evaluate the student on test (with its agreement with the teacher) "
                   "and register it as a version of --model, the gate's verdict on its card.")
@click.option("--promote", is_flag=True,
              help="Register, and move --alias to the student when it clears the student "
                   "gate (exit 1 when it does not).")
@click.option("--model", "model_name", default=None,
              help="Registry model of the student (default: the teacher's model + '-small').")
@alias_option
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Student gate: minimum test top-1.")
@click.option("--max-gap", type=float, default=0.01, show_default=True,
              help="Student gate: how far below the teacher's test top-1 the student may be.")
@run_reporting_options
def distill(teacher_ref: str | None, teacher_run: str | None, student: str | None,
            temperature: float | None, alpha: float | None, mixup: float | None,
            store: str | None, dataset: str | None, dataset_version: str | None, recipe: str,
            config_json: str | None, device: str, workers: int | None, run_id: str | None,
            register: bool, promote: bool, model_name: str | None, alias: str,
            threshold: float, max_gap: float, mlflow_uri: str | None,
            mlflow_tags: tuple[str, ...], exit_with_parent: int | None,
            json_progress: bool, as_json: bool, **options: Any) -> None:
    """Distil a teacher into a small student: train STUDENT on the published train split with
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels), both models seeing the
    same augmented images, selecting on valid.

    A training run like `flowerml train`: checkpoints every epoch, resumable with --run-id;
    --json adds `teacher` (name, version, sha256) and `agreement_valid` (the student's top-1
    agreement with the teacher on valid). Exit codes: 0 done, 1 --promote refused by the
    student gate, 2 bad input (one line; nothing is written).
    """
    from flowerml.core.launch import exit_with_parent_process
    from flowerml.core.recipes import build_distill_config
    from flowerml.distillation.distill import distill
    from flowerml.distillation.teacher import load_recorded_teacher, load_teacher
    from flowerml.registry.gates import StudentGate
    from flowerml.registry.names import check_name
    from flowerml.training.runs import RunFiles, check_run_id

    if exit_with_parent is not None:
        exit_with_parent_process(exit_with_parent)
    if teacher_ref is not None and teacher_run is not None:
        raise CliError("give --teacher or --teacher-run, not both")
    if config_json is not None and (student is not None or any(
            v is not None for v in options.values())):
        raise CliError("give --config or --student and training options, not both")
    gate = StudentGate(threshold=threshold, max_gap=max_gap)
    if model_name is not None:
        check_name(model_name)
    settings = load_settings(store=store, dataset=dataset, mlflow_uri=mlflow_uri)
    tags = extra_tags(mlflow_tags)
    target = build_store(settings)
    record = RunFiles(target, check_run_id(run_id)).optional_record() if run_id else None
    saved = plain(record) if record is not None else None
    saved_objective = saved.get("objective") if saved is not None else None
    typed = {"temperature": temperature, "alpha": alpha, "mixup": mixup}
    settings_for_run = build_distill_config(**{
        **({k: saved_objective[k] for k in typed} if saved_objective else {}),
        **{k: v for k, v in typed.items() if v is not None}})
    if teacher_ref is not None or teacher_run is not None:
        teacher = load_teacher(target, ref=teacher_ref, run_id=teacher_run)
    elif saved_objective and "teacher" in saved_objective:
        teacher = load_recorded_teacher(target, saved_objective["teacher"])
    else:
        raise CliError("give the teacher: --teacher NAME@ALIAS|NAME:VERSION or --teacher-run ID")
    config = student_config(config_json, None if recipe_was_typed() or config_json else saved,
                            recipe, student, teacher.trained.image_size, options)
    machine_output = as_json or json_progress
    with live_run(settings, target, run_id, announce_distill(json_progress), tags,
                  quiet=machine_output) as run:
        result = distill(config, settings_for_run, teacher, store=target,
                         dataset=settings.dataset, run_id=run.run_id,
                         cache_dir=settings.cache_dir, version=dataset_version, device=device,
                         workers=workers, s3=settings.s3_options(),
                         on_event=run.on_event, progress=run.progress)
    if result.fit.rank != 0:
        return  # under torchrun, rank 0 speaks for the run
    release = None
    if register or promote:
        from flowerml.distillation.distill import release_student

        release = release_student(target, result.fit.run_id, cache_dir=settings.cache_dir,
                                  model=model_name, alias=alias, gate=gate, promote=promote,
                                  device=device, workers=workers)
        mirror_registry(settings, target, release.model)
    report(result, release, as_json=as_json, machine_output=machine_output)
    if promote and release is not None and not release.promoted:
        sys.exit(EXIT_REFUSED)


def student_config(config_json: str | None, saved: dict | None, recipe: str,
                   student: str | None, teacher_image_size: int, options: dict[str, Any]):
    """The student's TrainConfig: --config as given; a resumed run's own config with what was
    typed on top; or the recipe with --student and the options (image size: the teacher's)."""
    from flowerml.core.recipes import build_config, load_config

    typed = {k: v for k, v in options.items() if v is not None}
    if config_json is not None:
        return load_config(config_json)
    if saved is not None and "config" in saved:
        return load_config(json.dumps({**saved["config"], **typed,
                                       **({"arch": student} if student else {})}))
    if student is None:
        raise CliError(f"--student is required: one of {', '.join(STUDENT_ARCHS)}")
    typed.setdefault("image_size", teacher_image_size)
    return build_config(recipe, **{**typed, "arch": student})


def announce_distill(json_progress: bool):
    """As `flowerml train`, but the resume hint names `flowerml distill`."""
    def on_event(event: dict) -> None:
        raise_if_stop_was_lost()
        if event.get("event") == "start":
            click.echo(f"flowerml: run {event['run_id']} (resume it with: flowerml distill "
                       f"--run-id {event['run_id']})", err=True)
        if json_progress:
            emit_json(event)
    return on_event


def report(result: Any, release: Any, *, as_json: bool, machine_output: bool) -> None:
    if as_json:
        emit_json(result.to_json() | ({"release": release.to_json()} if release else {}))
        return
    fit = result.fit
    agreement = (f", agreement with the teacher {result.agreement_valid:.4f}"
                 if result.agreement_valid is not None else "")
    say(f"run {fit.run_id}: student best valid top-1 {fit.best_valid_top1:.4f} (epoch "
        f"{fit.best_epoch} of {fit.epochs_run}){agreement}; teacher {result.teacher['label']};"
        f" weights {fit.checkpoint}", machine_output)
    if release is None:
        say(f"next: flowerml evaluate --run {fit.run_id}", machine_output)
        return
    verdict = "promoted" if release.promoted else (
        "clears the student gate" if release.passes else "does not clear the student gate")
    say(f"registered {release.label} (test top-1 {release.metrics['top1']:.4f}, teacher "
        f"{release.teacher_top1:.4f}, agreement {release.agreement:.4f}): {verdict}",
        machine_output)
    for reason in release.reasons:
        say(f"  - {reason}", machine_output)
