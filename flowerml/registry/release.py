"""Releasing a trained run: its model card (built and rendered), its registration, and loading
registered versions back. Whether a version may be promoted is `flowerml.registry.promotion`'s call.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from flowerml.core.documents import field_message, plain
from flowerml.core.markdown import cell, table
from flowerml.data.manifest import resolve_dataset
from flowerml.data.preprocessing import Preprocessing, recorded_preprocessing
from flowerml.evaluation.inference import TrainedModel, build_trained_model
from flowerml.evaluation.report import SYNTHETIC_NOTICE
from flowerml.io.storage import ObjectNotFound, Store
from flowerml.registry.aliases import DamagedRegistryDocument
from flowerml.registry.freshness import installed_flowerml
from flowerml.registry.names import parse_model_ref
from flowerml.registry.versions import CARD_FIELDS, CARD_JSON, ModelVersion, Registry
from flowerml.training.runs import RunFiles

REPORT_FILES = ("report.md", "confusion.png", "curves.png", "metrics.json", "per_class.json",
                "predictions.jsonl", "logits.npy")
LOADING_FIELDS = ("arch", "classes", "image_size")
"""The card's fields a model is built from (optional in `ModelCard`: release writes them)."""


def software_versions() -> dict[str, str | None]:
    """flowerml, its git commit when run from a checkout, torch and CUDA."""
    version = installed_flowerml()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"flowerml": version, "git_commit": commit, "torch": torch.__version__,
            "cuda": torch.version.cuda}


def build_card(store: Store, run_id: str, metrics: dict[str, Any], *, promote: bool,
               reasons: list[str], gate: dict[str, Any]) -> dict[str, Any]:
    """The model card of a run: what it is, how it scored, where it came from, and whether
    its data was synthetic (read from the dataset version's manifest)."""
    run = RunFiles(store, run_id)
    record, result = run.record(), run.result()
    dataset = resolve_dataset(store, record.dataset.name, record.dataset.version)
    preprocessing = recorded_preprocessing(record.preprocessing, record.config.image_size)
    return {
        "arch": record.config.arch,
        "synthetic_data": dataset.synthetic,
        "classes": [{"label": i + 1, "name": name} for i, name in enumerate(record.classes)],
        "image_size": record.config.image_size,
        "normalisation": {"mean": list(preprocessing.mean), "std": list(preprocessing.std)},
        "preprocessing": preprocessing.to_json(),
        "metrics": metrics,
        "test_manifest_sha256": dataset.split_sha256("test"),
        "gate": {**gate, "promote": promote, "reasons": reasons},
        "lineage": {"dataset": record.dataset.name,
                    "dataset_version": record.dataset.version,
                    "manifest_sha256": record.dataset.manifest_sha256,
                    "run_id": run_id, "training_config": plain(record.config),
                    "best_valid_top1": result.best_valid_top1,
                    "best_epoch": result.best_epoch, "epochs_run": result.epochs_run},
        "software": software_versions(),
        "device": record.device,
        "world_size": record.world_size,
        "wall_seconds": result.seconds,
    }


def render_card(card: dict, files: list[str] | None = None) -> str:
    """card.json as Markdown: a summary table, one section per nested dict or list, the files."""
    title = f"# {card.get('model', 'model')} v{int(card.get('version', 0)):06d}"
    scalars = {k: v for k, v in card.items() if not isinstance(v, dict | list)}
    lines = [title, ""]
    if card.get("synthetic_data"):
        lines += [SYNTHETIC_NOTICE, ""]
    lines += _field_table(sorted(scalars.items(), key=_summary_order))
    for key in sorted(k for k, v in card.items() if isinstance(v, dict | list)):
        lines += ["", f"## {key.replace('_', ' ').capitalize()}", ""]
        value = card[key]
        lines += _field_table(_flatten(value)) if isinstance(value, dict) else [
            f"- {cell(_format(item))}" for item in value]
    if files:
        lines += ["", "## Files", "", *[f"- [{name}]({name})" for name in sorted(files)]]
    return "\n".join(lines) + "\n"


def _summary_order(item: tuple[str, Any]) -> tuple[int, str]:
    # The registry's own fields first, in a fixed order; then the caller's, alphabetically.
    key = item[0]
    return (CARD_FIELDS.index(key), "") if key in CARD_FIELDS else (len(CARD_FIELDS), key)


def _flatten(value: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key in sorted(value):
        name = f"{prefix}{key}"
        if isinstance(value[key], dict):
            rows += _flatten(value[key], f"{name}.")
        else:
            rows.append((name, value[key]))
    return rows


def _field_table(rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return []
    return table(["field", "value"], [(_format(k), _format(v)) for k, v in rows]).splitlines()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def register_run(registry: Registry, store: Store, run_id: str, card: dict[str, Any], *,
                 split: str = "test") -> ModelVersion:
    """Register a run's best weights (checksum-verified) with its card, rendered, and its
    evaluation report."""
    run = RunFiles(store, run_id)
    weights = run.read_weights_bytes()
    files = {}
    for name in REPORT_FILES:
        try:
            files[name] = store.get_bytes(run.key(f"eval/{split}/{name}"))
        except ObjectNotFound:
            continue
    return registry.register(weights, card, files, render=render_card)


def load_version(registry: Registry, version: int, device: str = "auto") -> TrainedModel:
    """A committed version as a model ready to predict, its weights checksum-verified."""
    chosen = registry.require_committed(version)
    card = chosen.card
    absent = next((name for name in LOADING_FIELDS if card.get(name) is None), None)
    if absent is not None:
        raise DamagedRegistryDocument(field_message(
            registry.attachment_key(version, CARD_JSON), absent,
            "absent: a version's card needs it to load the model"))
    return build_trained_model(card["arch"], [c["name"] for c in card["classes"]],
                               card["image_size"], registry.load_weights(chosen.version),
                               source=chosen.label, weights_sha256=chosen.weights_sha256,
                               device=device, preprocessing=card_preprocessing(card))


def card_preprocessing(card: dict[str, Any]) -> Preprocessing:
    """What a card records its model expects (today's values for a card without the field)."""
    return recorded_preprocessing(card.get("preprocessing"), card["image_size"])


def load_registered_model(store: Store, ref: str, device: str = "auto") -> TrainedModel:
    """A registry version (e.g. 'flowers102@production'), its weights checksum-verified."""
    model, alias, version = parse_model_ref(ref)
    registry = Registry(store, model)
    return load_version(registry, registry.resolve(alias, version).version, device)
