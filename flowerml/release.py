"""Releasing a trained run: its model card, its registration, and the champion it must beat.

The gate compares scores measured on the same test manifest; when the production model was
measured on another one (the dataset changed), it is re-evaluated on the current test split
first, so the comparison is fair.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from flowerml.data import IMAGENET_MEAN, IMAGENET_STD, PublishedDataset, resolve_dataset
from flowerml.inference import TrainedModel, build_trained_model, evaluate_model
from flowerml.registry import (
    AliasState,
    Gate,
    ModelVersion,
    Registry,
    Scorecard,
    decide_promotion,
    parse_model_ref,
)
from flowerml.runs import RunFiles
from flowerml.storage import ObjectNotFound, Store

REPORT_FILES = ("report.md", "confusion.png", "curves.png", "metrics.json", "per_class.json")


def software_versions() -> dict[str, str | None]:
    """flowerml, its git commit when run from a checkout, torch and CUDA."""
    try:
        version = metadata.version("flowerml")
    except metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"flowerml": version, "git_commit": commit, "torch": torch.__version__,
            "cuda": torch.version.cuda}


def build_card(store: Store, run_id: str, metrics: dict[str, Any], *, promote: bool,
               reasons: list[str], gate: dict[str, Any]) -> dict[str, Any]:
    """The model card of a run: what it is, how it scored, where it came from."""
    run = RunFiles(store, run_id)
    record = run.read_json("config.json")
    result = run.read_json("result.json")
    config = record["config"]
    return {
        "arch": config["arch"],
        "classes": [{"label": i + 1, "name": name} for i, name in enumerate(record["classes"])],
        "image_size": config["image_size"],
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "metrics": metrics,
        "test_manifest_sha256": record["dataset"]["manifest_sha256"],
        "gate": {**gate, "promote": promote, "reasons": reasons},
        "lineage": {"dataset": record["dataset"]["name"],
                    "dataset_version": record["dataset"]["version"],
                    "manifest_sha256": record["dataset"]["manifest_sha256"],
                    "run_id": run_id, "training_config": config,
                    "best_valid_top1": result["best_valid_top1"],
                    "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"]},
        "software": software_versions(),
        "device": record["device"],
        "world_size": record.get("world_size", 1),
        "wall_seconds": result["seconds"],
    }


def register_run(registry: Registry, store: Store, run_id: str, card: dict[str, Any], *,
                 split: str = "test") -> ModelVersion:
    """Register a run's best weights (checksum-verified) with its card and evaluation report."""
    run = RunFiles(store, run_id)
    weights = run.read_weights_bytes()
    files = {}
    for name in REPORT_FILES:
        try:
            files[name] = store.get_bytes(run.key(f"eval/{split}/{name}"))
        except ObjectNotFound:
            continue
    return registry.register(weights, card, files)


def champion_scorecard(registry: Registry, store: Store, published: PublishedDataset, *,
                       alias: str, cache_dir: Path, device: str = "auto",
                       workers: int | None = None) -> Scorecard | None:
    """The production model's score on this test manifest (re-evaluated if it differs)."""
    state = registry.alias(alias)
    if state is None:
        return None
    champion = registry.require_committed(state.version)
    card = champion.card
    if card.get("test_manifest_sha256") == published.manifest_sha256:
        return Scorecard.from_card(card, champion.version)
    trained = build_trained_model(card["arch"], [c["name"] for c in card["classes"]],
                                  card["image_size"], registry.load_weights(champion.version),
                                  source=champion.label, weights_sha256=champion.weights_sha256,
                                  device=device)
    metrics = evaluate_model(trained, store, published, cache_dir=cache_dir, workers=workers)
    return Scorecard(metrics.top1, published.manifest_sha256, champion.version)


def load_registered_model(store: Store, ref: str, device: str = "auto") -> TrainedModel:
    """A registry version (e.g. 'flowers102@production'), its weights checksum-verified."""
    model, alias, version = parse_model_ref(ref)
    registry = Registry(store, model)
    chosen = registry.resolve(alias, version)
    card = chosen.card
    return build_trained_model(card["arch"], [c["name"] for c in card["classes"]],
                               card["image_size"], registry.load_weights(chosen.version),
                               source=chosen.label, weights_sha256=chosen.weights_sha256,
                               device=device)


def promote_version(registry: Registry, store: Store, version: int, *, alias: str, gate: Gate,
                    force: bool, cache_dir: Path, device: str = "auto"
                    ) -> tuple[bool, list[str], AliasState | None]:
    """`flowerml registry promote`: the gate against the current alias, on the candidate's data."""
    candidate = registry.require_committed(version)
    registry.verify(version)  # refuse bad weights before any evaluation work
    lineage = candidate.card["lineage"]
    published = resolve_dataset(store, lineage["dataset"], lineage["dataset_version"])
    champion = champion_scorecard(registry, store, published, alias=alias, cache_dir=cache_dir,
                                  device=device)
    return registry.promote(version, scorecard=Scorecard.from_card(candidate.card, version),
                            champion=champion, gate=gate, alias=alias, force=force)


def judge_candidate(store: Store, model: str, alias: str, top1: float, dataset: str,
                    version: str, gate: Gate, *, force: bool, cache_dir: Path,
                    device: str = "auto") -> tuple[bool, list[str], Scorecard, Scorecard | None]:
    """The gate's verdict on a candidate's test top-1 against the alias's current model."""
    published = resolve_dataset(store, dataset, version)
    champion = champion_scorecard(Registry(store, model), store, published, alias=alias,
                                  cache_dir=cache_dir, device=device)
    candidate = Scorecard(top1, published.manifest_sha256)
    promote, reasons = decide_promotion(candidate, champion, gate, force=force)
    return promote, reasons, candidate, champion
