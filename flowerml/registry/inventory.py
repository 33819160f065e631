"""What is on a store, described for people: the training runs under `runs/` and the published
datasets under `datasets/`, and the two changes made from that view: deleting a run, and
checking that a run's test evaluation may go on its model card.

Everything here reads JSON documents only (configs, pointers, results, manifests, cards), never
tensors, so listing a store does not import torch. A document that cannot be read is reported
as the run's or the version's `problem`, not raised: one damaged run must not hide the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from flowerml.core.documents import plain
from flowerml.core.errors import DatasetNotFound, FlowermlError, UserError
from flowerml.data.manifest import (
    MANIFEST,
    SPLITS,
    DamagedManifest,
    check_name,
    current_key,
    dataset_prefix,
    manifest_key,
    quarantine_key,
    read_current,
    read_manifest,
    version_prefix,
)
from flowerml.data.manifest import read_quarantine as read_quarantine_document
from flowerml.evaluation.predictions import METRICS_FILE, EvaluationMetrics
from flowerml.io.storage import ObjectNotFound, Store
from flowerml.registry.versions import Registry, list_models
from flowerml.training.runs import (
    BEST,
    CHECKPOINT,
    RESULT_JSON,
    BlobPointer,
    RunError,
    RunFiles,
    RunResult,
    check_run_id,
    run_ids,
)
from flowerml.training.tensorboard_log import tensorboard_logdir

RAW = "raw"  # datasets/<name>/raw/: the verified source files, not a version


class RunRegistered(UserError):
    """A run that registry versions came from, which a deletion would orphan."""

    kind = "refused"


class EvaluationMissing(UserError):
    """A run with no test evaluation of its current weights."""

    kind = "refused"


def location(store: Store, key: str) -> str:
    """The full location of a key, or of a folder when it ends in '/': a path under a local
    store, an s3:// URI under S3."""
    return store.location(key.rstrip("/")) + ("/" if key.endswith("/") else "")


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Evaluation:
    """A run's evaluation on one split, as `flowerml evaluate` published it."""

    split: str
    metrics: dict[str, Any]
    report: str  # full location of report.md
    dataset: str | None  # "<name>@<version>" it was measured on, from the report
    weights_sha256: str | None  # prefix of the evaluated weights' sha256, from the report


@dataclass
class RunSummary:
    """One run as `flowerml runs list` shows it."""

    run_id: str
    location: str
    status: str  # finished | incomplete | not started | damaged
    dataset: str | None = None
    dataset_version: str | None = None
    arch: str | None = None
    epochs: int | None = None
    epochs_done: int = 0
    best_valid_top1: float | None = None
    best_epoch: int | None = None
    test_top1: float | None = None
    registered: list[str] = field(default_factory=list)
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunDetails(RunSummary):
    """One run as `flowerml runs show` shows it: the summary, its configuration, every epoch,
    every evaluation and every extension."""

    config: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None
    device: str | None = None
    world_size: int | None = None
    stopped_early: bool = False
    seconds: float | None = None
    history: list[dict] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    extensions: list[dict] = field(default_factory=list)
    files: int = 0
    tensorboard: str | None = None  # the --logdir of its event files, when it has any


def registrations(store: Store) -> dict[str, list[str]]:
    """The registry versions each run id became, as `model:NNNNNN` labels (from the cards'
    lineage)."""
    found: dict[str, list[str]] = {}
    for model in list_models(store):
        for version in Registry(store, model).versions():
            run_id = version.card.get("lineage", {}).get("run_id")
            if isinstance(run_id, str):
                found.setdefault(run_id, []).append(f"{model}:{version.version:06d}")
    return found


def list_runs(store: Store) -> list[RunSummary]:
    """Every run on the store, by id (ids made by `flowerml train` sort by start time)."""
    registered = registrations(store)
    return [summarise_run(RunFiles(store, run_id), registered.get(run_id, []))
            for run_id in run_ids(store)]


def open_run(store: Store, run_id: str) -> RunFiles:
    """The run `run_id`: RunError for a malformed id, RunNotFound when it has no files."""
    return RunFiles(store, check_run_id(run_id, "run id")).require()


def describe_run(store: Store, run_id: str) -> RunDetails:
    """Everything `flowerml runs show` prints about one run."""
    run = open_run(store, run_id)
    details = RunDetails(**asdict(summarise_run(run, registrations(store).get(run_id, []))))
    keys = run.keys()
    details.files = len(keys)
    details.tensorboard = tensorboard_logdir(run, keys)
    if details.problem is None:
        read_into(run, details, fill_details)
    return details


def summarise_run(run: RunFiles, registered: list[str]) -> RunSummary:
    summary = RunSummary(run.run_id, location(run.store, run.key("")), "damaged",
                         registered=sorted(registered))
    read_into(run, summary, fill_summary)
    return summary


def read_into(run: RunFiles, summary: RunSummary,
              fill: Callable[[RunFiles, Any], None]) -> None:
    """`fill(run, summary)`, a damaged file recorded as the summary's problem."""
    try:
        fill(run, summary)
    except FlowermlError as error:
        summary.problem = str(error)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        summary.status = "damaged"
        summary.problem = f"{location(run.store, run.key(''))}: unexpected content ({error!r})"


def fill_summary(run: RunFiles, summary: RunSummary) -> None:
    record = run.optional_record()
    if record is None:
        summary.problem = (f"no config.json: leftovers of a run that never started "
                           f"(flowerml runs delete {run.run_id} removes them)")
        return
    summary.dataset = record.dataset.name
    summary.dataset_version = record.dataset.version
    summary.arch = record.config.arch
    summary.epochs = record.config.epochs
    checkpoint = optional_pointer(run, CHECKPOINT.pointer)
    result = run.read_optional(RESULT_JSON, RunResult)
    best = optional_pointer(run, BEST.pointer)
    summary.epochs_done = checkpoint["epoch"] if checkpoint else 0
    if best is not None:
        summary.best_valid_top1, summary.best_epoch = best.get("valid_top1"), best.get("epoch")
    if result is not None and (checkpoint is None or result.epochs_run == summary.epochs_done):
        summary.status = "finished"
        summary.best_valid_top1 = result.best_valid_top1
        summary.best_epoch = result.best_epoch
    else:
        summary.status = "incomplete" if checkpoint else "not started"
    test = read_evaluation(run, "test")
    summary.test_top1 = test.metrics.get("top1") if test else None


def optional_pointer(run: RunFiles, pointer: str) -> dict[str, Any] | None:
    """A run's pointer (checkpoint.json, best.json) with its extras, validated; None when the
    run has none."""
    found = run.read_optional(pointer, BlobPointer)
    return plain(found) if found is not None else None


def fill_details(run: RunFiles, details: RunDetails) -> None:
    found = run.optional_record()
    if found is None:
        return
    record = plain(found)  # as stored: a field an older writer left out shows as absent
    details.config = record["config"]
    details.manifest_sha256 = record["dataset"]["manifest_sha256"]
    details.device = record["device"]
    details.world_size = record.get("world_size")
    details.extensions = record.get("extensions", [])
    result = run.read_optional(RESULT_JSON, RunResult)
    details.stopped_early = result.stopped_early if result is not None else False
    details.seconds = result.seconds if result is not None else None
    details.history = run.read_history()
    details.evaluations = [evaluation for split in evaluated_splits(run)
                           if (evaluation := read_evaluation(run, split)) is not None]


def evaluated_splits(run: RunFiles) -> list[str]:
    prefix = run.key("eval/")
    splits = {info.key[len(prefix):].split("/")[0] for info in run.store.list(prefix)
              if info.key.endswith("/metrics.json")}
    return sorted(splits)


# The context table of an evaluation report (flowerml.evaluation.inference.publish_report) names the
# dataset version and the weights it measured: `| **dataset** | flowers102@abc |`.
_REPORT_FIELD = r"^\|\s*\*\*{name}\*\*\s*\|\s*(?P<value>[^|]+?)\s*\|\s*$"


def _report_field(report: str, name: str) -> str | None:
    match = re.search(_REPORT_FIELD.format(name=re.escape(name)), report, re.MULTILINE)
    return match.group("value") if match else None


def read_evaluation(run: RunFiles, split: str) -> Evaluation | None:
    """The run's published evaluation on `split`, or None when it has none."""
    metrics = run.read_optional(f"eval/{split}/{METRICS_FILE}", EvaluationMetrics)
    if metrics is None:
        return None
    report_key = run.key(f"eval/{split}/report.md")
    try:
        report = run.store.get_bytes(report_key).decode(errors="replace")
    except ObjectNotFound:
        report = ""
    summary = metrics.model_dump(include={"top1", "top5", "mean_class_accuracy", "loss", "n"})
    return Evaluation(split, summary, location(run.store, report_key),
                      _report_field(report, "dataset"), _report_field(report, "weights sha256"))


def current_test_evaluation(store: Store, run_id: str) -> tuple[dict[str, Any], Evaluation]:
    """A finished run's config.json record and its test evaluation, checked to be of the
    weights the run holds now and of the dataset version it trained on: what a model card may
    claim. Refused (one line saying what to run) otherwise."""
    run = open_run(store, run_id)
    if not run.exists() or not run.store.exists(run.key("result.json")):
        raise RunError(f"run '{run_id}' has not finished training (no result.json in "
                       f"{location(store, run.key(''))}); train it to the end first")
    record = plain(run.record())
    evaluate = f"run flowerml evaluate --run {run_id} first"
    evaluation = read_evaluation(run, "test")
    if evaluation is None:
        raise EvaluationMissing(f"run '{run_id}' has no test evaluation: {evaluate}")
    trained_on = f"{record['dataset']['name']}@{record['dataset']['version']}"
    if evaluation.dataset != trained_on:
        measured = evaluation.dataset or "an unrecorded dataset version"
        raise EvaluationMissing(f"run '{run_id}' was evaluated on {measured}, not on "
                                f"{trained_on} it trained on: {evaluate}")
    weights = run.read_pointer(BEST.pointer)["sha256"]
    if not evaluation.weights_sha256 or not weights.startswith(evaluation.weights_sha256):
        raise EvaluationMissing(f"run '{run_id}''s test evaluation is of other weights than its "
                                f"best ones now (it trained further since): {evaluate}")
    return record, evaluation


class AlreadyRegistered(UserError):
    """A run whose current weights are already a version of the model."""

    kind = "refused"


def registrable_run(store: Store, model: str, run_id: str) -> Evaluation:
    """The test evaluation a run's registration as `model` would put on its card: refused
    unless `current_test_evaluation` accepts it and no version of `model` already holds the
    run's current weights (registering twice would make a second, identical version)."""
    registry = Registry(store, model)
    _, evaluation = current_test_evaluation(store, run_id)
    weights = RunFiles(store, run_id).read_pointer(BEST.pointer)["sha256"]
    same = [f"{model}:{version.version:06d}" for version in registry.versions()
            if version.committed and version.weights_sha256 == weights]
    if same:
        raise AlreadyRegistered(f"run '{run_id}' is already registered as {same[0]} (the same "
                                "weights)")
    return evaluation


@dataclass(frozen=True)
class DeletedRun:
    run_id: str
    location: str
    files: int
    registered: list[str]
    forced: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def delete_run(store: Store, run_id: str, *, force: bool = False) -> DeletedRun:
    """Delete every file of a run. A run that registry versions came from is refused unless
    `force` (the versions keep their own weights and card; only the lineage's run is gone)."""
    run = open_run(store, run_id)
    registered = sorted(registrations(store).get(run_id, []))
    if registered and not force:
        raise RunRegistered(f"run '{run_id}' is the source of registry version"
                            f"{'s' if len(registered) > 1 else ''} {', '.join(registered)}; "
                            "--force deletes it anyway (the versions keep their weights)")
    files = run.delete()
    return DeletedRun(run_id, location(store, run.key("")), files, registered, force)


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass
class DatasetVersion:
    """One published (or half-published) version of a dataset."""

    version: str
    location: str
    current: bool = False
    complete: bool = False  # has its manifest.json
    counts: dict[str, int] = field(default_factory=dict)
    classes: int | None = None
    quarantined: int | None = None
    synthetic: bool | None = None
    problem: str | None = None
    quarantine: list[dict] | None = None  # the quarantined images, when asked for
    parent: str | None = None  # the version an addition (ingest --add) published this on
    added: dict[str, dict[str, int]] | None = None  # split -> class folder -> images added
    skipped: dict[str, int] | None = None  # already_present, leakage, rejected: how many

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "quarantine" or v is not None}


@dataclass
class DatasetSummary:
    name: str
    location: str
    current: str | None
    versions: list[DatasetVersion]
    problem: str | None = None
    chain: list[str] = field(default_factory=list)  # CURRENT, its parent, ... the ingest


    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "versions"},
                "versions": [v.to_json() for v in self.versions]}


def dataset_layout(store: Store, prefix: str = "datasets/") -> dict[str, dict[str, bool]]:
    """{dataset: {version: has manifest.json}} from one listing of `prefix`."""
    layout: dict[str, dict[str, bool]] = {}
    for info in store.list(prefix):
        parts = info.key.split("/")
        if len(parts) < 3 or not parts[1]:
            continue
        versions = layout.setdefault(parts[1], {})
        if len(parts) >= 4 and parts[2] != RAW:
            versions[parts[2]] = versions.get(parts[2], False) or (
                len(parts) == 4 and parts[3] == MANIFEST)
    return layout


def list_datasets(store: Store) -> list[DatasetSummary]:
    """Every dataset on the store, with its versions (CURRENT's first)."""
    return [summarise_dataset(store, name, versions)
            for name, versions in sorted(dataset_layout(store).items())]


def describe_dataset(store: Store, name: str, *, quarantine: bool = True) -> DatasetSummary:
    """One dataset's versions; DatasetNotFound when nothing of it is on the store."""
    check_name("dataset name", name)
    versions = dataset_layout(store, f"{dataset_prefix(name)}/").get(name)
    if versions is None:
        raise DatasetNotFound(f"dataset '{name}' is not on {store.uri} (flowerml datasets list "
                              "shows what is; flowerml ingest publishes one)")
    summary = summarise_dataset(store, name, versions)
    if quarantine:
        for version in summary.versions:
            if version.complete:
                version.quarantine = read_quarantine(store, name, version.version)
    return summary


def summarise_dataset(store: Store, name: str, versions: dict[str, bool]) -> DatasetSummary:
    problem = None
    try:
        current = (read_current(store, name) or {}).get("version")
    except FlowermlError as error:
        current, problem = None, str(error)
    described = [describe_version(store, name, version, complete, version == current)
                 for version, complete in versions.items()]
    described.sort(key=lambda v: (not v.current, v.version))
    if current is not None and current not in versions:
        problem = f"{location(store, current_key(name))} names version {current}, which is " \
                  "not on the store"
    return DatasetSummary(name, location(store, f"{dataset_prefix(name)}/"), current, described,
                          problem, version_chain(current, described))


def version_chain(current: str | None, versions: list[DatasetVersion]) -> list[str]:
    """CURRENT, then each parent an addition recorded, down to the ingested version."""
    parents = {v.version: v.parent for v in versions}
    chain: list[str] = []
    version = current
    while version in parents and version not in chain:
        chain.append(version)
        version = parents.get(version)
    return chain


def describe_version(store: Store, name: str, version: str, complete: bool,
                     current: bool) -> DatasetVersion:
    described = DatasetVersion(version, location(store, f"{version_prefix(name, version)}/"),
                               current, complete)
    if not complete:
        described.problem = "no manifest.json: an interrupted ingest (ingesting again finishes it)"
        return described
    key = manifest_key(name, version)
    try:
        manifest = read_manifest(location(store, key), store.get_bytes(key))
    except ObjectNotFound:
        described.complete = False
        described.problem = "manifest.json disappeared while listing"
        return described
    except DamagedManifest as error:
        described.problem = str(error)
        return described
    counts = manifest.counts
    described.counts = {split: counts[split]  # in split order, not the file's
                        for split in sorted(counts, key=split_order)}
    described.classes = len(manifest.classes)
    described.quarantined = manifest.quarantined
    described.synthetic = manifest.synthetic
    described.parent = manifest.parent
    if manifest.addition is not None:
        described.added = manifest.addition.added
        described.skipped = {"already_present": len(manifest.addition.already_present),
                             "leakage": len(manifest.addition.leakage),
                             "rejected": len(manifest.addition.rejected)}
    return described


def split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split), "") if split in SPLITS else (len(SPLITS), split)


def read_quarantine(store: Store, name: str, version: str) -> list[dict]:
    """The images ingest set aside for this version, and why (empty when none)."""
    key = quarantine_key(name, version)
    try:
        entries = read_quarantine_document(location(store, key), store.get_bytes(key))
    except ObjectNotFound:
        return []
    except DamagedManifest as error:
        return [{"problem": str(error)}]
    return [plain(entry) for entry in entries]

