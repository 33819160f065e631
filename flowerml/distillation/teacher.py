"""The teacher of a distillation: a frozen model to learn from, and how a run records it.

A teacher is a registry version (`NAME@ALIAS`, `NAME:VERSION`) or a training run, loaded
sha-verified (through `release.load_version` / `inference.load_trained_model`), in eval mode,
without gradients; a run records who it is (`Teacher.identity`) and a resume or an evaluation
loads exactly those weights again (`load_recorded_teacher`). `DistillError` is the user error
of every distillation module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from flowerml.core.errors import UserError
from flowerml.data.manifest import PublishedDataset
from flowerml.evaluation.inference import TrainedModel, load_trained_model
from flowerml.io.storage import Store
from flowerml.registry.names import RegistryError, parse_model_ref
from flowerml.registry.release import load_version
from flowerml.registry.versions import Registry
from flowerml.training.runs import BEST, RunFiles, check_run_id

STUDENT_SUFFIX = "-small"


class DistillError(UserError):
    """A teacher or student that cannot be used together, or a run that was not distilled."""


@dataclass
class Teacher:
    """A frozen model to learn from, and how a run records it (`identity`: source, name and
    version or run id, sha256, label)."""

    trained: TrainedModel
    identity: dict[str, Any]
    file_bytes: int

    @property
    def model(self) -> nn.Module:
        return self.trained.model

    @property
    def label(self) -> str:
        return self.identity["label"]

    def check_classes(self, published: PublishedDataset) -> None:
        """The student learns the teacher's outputs class by class: the lists must be equal."""
        if self.trained.class_names != published.class_names:
            raise DistillError(
                f"teacher {self.label} was trained on {len(self.trained.class_names)} classes "
                f"that differ from {published.dataset}@{published.version}'s "
                f"{published.num_classes}: a student can only learn the teacher's own classes")


def freeze(trained: TrainedModel) -> TrainedModel:
    """Eval mode (BatchNorm's running statistics, no dropout) and no gradients, for good."""
    trained.model.eval()
    trained.model.requires_grad_(False)
    return trained


def load_teacher(store: Store, *, ref: str | None = None, run_id: str | None = None,
                 device: str = "cpu") -> Teacher:
    """The teacher `--teacher NAME@ALIAS|NAME:VERSION` or `--teacher-run ID` names, its
    weights checksum-verified, frozen. An alias is resolved here, once: the run records the
    version it named."""
    if (ref is None) == (run_id is None):
        raise DistillError("give the teacher as --teacher NAME@ALIAS|NAME:VERSION or as "
                           "--teacher-run ID (one of them)")
    if ref is not None:
        return _registry_teacher(store, ref, device)
    return _run_teacher(store, run_id, device)


def _registry_teacher(store: Store, ref: str, device: str) -> Teacher:
    try:
        name, alias, number = parse_model_ref(ref)
        registry = Registry(store, name)
        chosen = registry.resolve(alias, number)
        trained = load_version(registry, chosen.version, device)
    except RegistryError as error:
        raise type(error)(f"--teacher {ref}: {error}") from None
    weights = store.head(f"registry/{name}/versions/{chosen.version:06d}/model.safetensors")
    identity = {"source": "registry", "name": name, "version": chosen.version,
                "sha256": chosen.weights_sha256, "label": chosen.label}
    return Teacher(freeze(trained), identity, weights.size if weights else 0)


def _run_teacher(store: Store, run_id: str, device: str) -> Teacher:
    run = RunFiles(store, check_run_id(run_id, "--teacher-run"))
    if not run.exists():
        raise DistillError(f"--teacher-run {run_id}: no such run on {store.uri}")
    trained = load_trained_model(store, run_id, device)
    identity = {"source": "run", "run_id": run_id, "sha256": trained.weights_sha256,
                "label": f"run {run_id}"}
    return Teacher(freeze(trained), identity, int(run.read_pointer(BEST.pointer)["size"]))


def load_recorded_teacher(store: Store, identity: dict[str, Any], device: str = "cpu") -> Teacher:
    """The teacher a run records, refused when its weights are no longer the recorded ones."""
    if identity["source"] == "registry":
        teacher = load_teacher(store, ref=f"{identity['name']}:{identity['version']}",
                               device=device)
    else:
        teacher = load_teacher(store, run_id=identity["run_id"], device=device)
    if teacher.identity["sha256"] != identity["sha256"]:
        raise DistillError(f"teacher {identity['label']} no longer holds the weights this run "
                           f"was distilled from (sha256 {identity['sha256'][:12]}..., now "
                           f"{teacher.identity['sha256'][:12]}...)")
    return teacher


def default_student_model(teacher: Teacher, dataset: str) -> str:
    """`<teacher-model>-small`; a teacher run has no model name, so its dataset's is used."""
    base = teacher.identity.get("name") or dataset
    return f"{base}{STUDENT_SUFFIX}"
