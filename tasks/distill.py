"""Prefect tasks for distillation: pin the teacher, train the student in a child process, release
it on its own gate.

The student trains like the teacher does (`tasks.train`): `flowerml distill` in a child process
whose progress lines become log lines and a progress artifact, the whole process group stopped on
cancellation or timeout, a retry resuming the same run id. The teacher is named by version
(`NAME:VERSION`, pinned by `resolve_teacher_task` or by the retrain flow), so a retry learns from
the same weights even if the alias moved meanwhile.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flowerml.core.recipes import build_distill_config, load_config
from flowerml.settings import build_store, load_settings
from tasks.common import artifact_key, retry_transient
from tasks.train import child_arguments, run_training_child


def distill_command(arguments: list[str], nproc_per_node: int = 1) -> list[str]:
    """`flowerml distill ...` (under torchrun for several GPUs) that dies with this process."""
    command = ["-m", "flowerml.cli", "distill", "--exit-with-parent", str(os.getpid()),
               *arguments]
    if nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc_per_node}", *command]
    return [sys.executable, *command]


@task(name="resolve-teacher", task_run_name="resolve teacher {teacher}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def resolve_teacher_task(teacher: str, store: str | None = None) -> dict[str, Any]:
    """The version an alias names now, with the data and training config it came from."""
    from flowerml.registry.versions import resolve_ref

    version = resolve_ref(build_store(load_settings(store=store)), teacher)
    lineage = version.card["lineage"]
    return {"ref": f"{version.model}:{version.version}", "label": version.label,
            "dataset": lineage["dataset"], "dataset_version": lineage["dataset_version"],
            "training_config": lineage["training_config"]}


@task(name="distill", task_run_name="distill {run_id} from {teacher}", retries=2,
      retry_delay_seconds=30, retry_condition_fn=retry_transient)
def distill_task(run_id: str, teacher: str, config: dict[str, Any],
                 distillation: dict[str, Any], store: str | None = None,
                 dataset: str | None = None, dataset_version: str | None = None,
                 device: str = "auto", workers: int | None = None, nproc_per_node: int = 1,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """Train (or resume) student run `run_id` (a TrainConfig) on `teacher`; returns
    `flowerml distill --json`."""
    config_json = load_config(json.dumps(config)).model_dump_json()
    settings = build_distill_config(**distillation)
    arguments = child_arguments(run_id, config_json, teacher=teacher,
                                temperature=settings.temperature, alpha=settings.alpha,
                                mixup=settings.mixup, store=store, dataset=dataset,
                                dataset_version=dataset_version, device=device, workers=workers)
    return run_training_child(run_id, distill_command(arguments, nproc_per_node), timeout_s,
                              "distillation run")


@task(name="release-student", task_run_name="release student {run_id}", retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_transient)
def release_student_task(run_id: str, model: str | None, alias: str, gate: dict[str, Any],
                         store: str | None = None, device: str = "auto",
                         workers: int | None = None) -> dict[str, Any]:
    """Evaluate the student, register it under its own model name, promote it on the student
    gate; a report artifact says what it costs next to its teacher. `workers`: DataLoader
    processes for its evaluations (None: one per core), as the run was trained with."""
    from flowerml.distillation.distill import release_student
    from flowerml.registry.gates import StudentGate

    settings = load_settings(store=store)
    release = release_student(build_store(settings), run_id, cache_dir=settings.cache_dir,
                              model=model, alias=alias, gate=StudentGate(**gate), promote=True,
                              device=device, workers=workers)
    create_markdown_artifact(student_report(release.to_json()),
                             key=artifact_key(release.model, "student-release"),
                             description=f"Student {release.label} of {release.teacher['label']}")
    return release.to_json()


def student_report(release: dict[str, Any]) -> str:
    """The release as Markdown: the verdict, the reasons, and both models' cost side by side."""
    verdict = "promoted" if release["promoted"] else "not promoted"
    lines = [f"# {release['label']}: {verdict} to {release['alias']}", "",
             f"- teacher: {release['teacher']['label']} (sha256 "
             f"{release['teacher']['sha256'][:16]}...)",
             f"- test top-1: student {release['metrics']['top1']:.4f}, teacher "
             f"{release['teacher_top1']:.4f}; agreement {release['agreement']:.4f}", "",
             "## Student gate", "", *[f"- {reason}" for reason in release["reasons"]]]
    efficiency = release.get("efficiency") or {}
    if efficiency:
        student, teacher = efficiency["student"], efficiency["teacher"]
        lines += ["", "## Cost per image", "", "| | student | teacher |", "|---|---|---|",
                  f"| arch | {student['arch']} | {teacher['arch']} |",
                  f"| parameters | {student['params'] / 1e6:.2f} M | "
                  f"{teacher['params'] / 1e6:.2f} M |",
                  f"| MACs at {student['image_size']} / {teacher['image_size']} px | "
                  f"{student['macs'] / 1e9:.3f} G | {teacher['macs'] / 1e9:.3f} G |",
                  f"| weights file | {student['file_bytes'] / 1e6:.1f} MB | "
                  f"{teacher['file_bytes'] / 1e6:.1f} MB |",
                  f"| CPU images/s ({student['cpu_threads']} threads) | "
                  f"{student['cpu_images_per_second']:.1f} | "
                  f"{teacher['cpu_images_per_second']:.1f} |", "",
                  f"The student needs {efficiency['macs_ratio']:g}x fewer MACs and runs "
                  f"{efficiency['cpu_speedup']:g}x as fast on this worker's CPU."]
    return "\n".join(lines) + "\n"
