"""Bringing MLflow's Model Registry level with ours: `sync_model` (what `flowerml registry
sync-mlflow NAME` runs, and what registering, promoting and rolling back run after they succeed
when tracking is on).

Our registry is the source of truth (compare-and-swap aliases, gap-free history); MLflow's
aliases are last-writer-wins, so a mirror sets each MLflow alias to the version ours points at
*after* our move has won, then reads ours again and repeats until MLflow and ours agree: of two
racing promotions, whichever mirror writes last has read the winner, so MLflow ends at the
winner. Idempotent: a second sync changes nothing.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flowerml.io.storage import ObjectNotFound, Store
from flowerml.registry.export_record import ONNX_FILE, load_onnx_bytes, read_export
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import CARD_JSON, CARD_MD, WEIGHTS, ModelVersion, Registry
from flowerml.tracking.registry_mirror import ONNX_TAG, ModelMirror
from flowerml.tracking.server import TrackingServer, failure_reason

logger = logging.getLogger(__name__)

ALIAS_ROUNDS = 5
"""How many times a sync re-reads our aliases after setting MLflow's, when they keep moving."""


@dataclass
class SyncResult:
    """What a sync changed in MLflow: versions created (flowerml -> MLflow number), ONNX
    exports added, aliases set (alias -> flowerml version)."""

    created: dict[int, int] = field(default_factory=dict)
    onnx_added: list[int] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)


def version_tags(entry: ModelVersion) -> dict[str, object]:
    software = entry.card.get("software") or {}
    return {"flowerml.sha256": entry.weights_sha256, "flowerml.model": entry.model,
            "flowerml.flowerml_version": software.get("flowerml"),
            "flowerml.run_id": entry.card.get("run_id")}


def sync_model(server: TrackingServer, store: Store, model: str) -> SyncResult:
    """Mirror every committed version of `model` (and an ONNX export it gained since), then
    its aliases."""
    registry = Registry(store, model)
    mirror = ModelMirror(server, model)
    result = SyncResult()
    mirror.ensure_model(f"Mirror of flowerml's registry model {model}: flowerml's "
                        "aliases and versions are the source of truth.")
    mirrored = mirror.versions()
    committed = [entry for entry in registry.versions() if entry.committed]
    for entry in committed:  # before anything is written
        if entry.version in mirrored:
            check_same_weights(entry, mirrored[entry.version], server)
    with tempfile.TemporaryDirectory(prefix="flowerml-mlflow-") as temp:
        for entry in committed:
            if entry.version not in mirrored:
                mirrored[entry.version] = _add_version(registry, mirror, entry, Path(temp))
                result.created[entry.version] = int(mirrored[entry.version].version)
            if _add_onnx(registry, mirror, entry, mirrored[entry.version], Path(temp)):
                result.onnx_added.append(entry.version)
    result.aliases = sync_aliases(registry, mirror, mirrored)
    return result


class MirrorConflict(RegistryError):
    """MLflow's registered model of that name mirrors other weights (another store's registry
    uses the same model name on this tracking server)."""


def check_same_weights(entry: ModelVersion, mirrored, server: TrackingServer) -> None:
    theirs = mirrored.tags.get("flowerml.sha256")
    if theirs != entry.weights_sha256:
        raise MirrorConflict(
            f"MLflow model {entry.model} at {server.shown}: its version {mirrored.version} "
            f"mirrors {entry.label} with other weights (sha256 {str(theirs)[:12]}..., ours "
            f"{entry.weights_sha256[:12]}...): another store's registry uses the name "
            f"{entry.model} on this server; nothing was changed in MLflow")


def mirror_model(tracking_uri: str | None, store: Store, model: str) -> bool:
    """`sync_model` after our registry changed (a registration, a promotion, a rollback), when
    `tracking_uri` is set; False when it was not done. Never raises: the mirror must not fail
    what already happened in our registry; it says so in one warning line naming the command
    that brings it level."""
    if not tracking_uri:
        return False
    server = TrackingServer(tracking_uri)
    try:
        sync_model(server, store, model)
    except Exception as error:
        logger.warning("MLflow registry at %s is behind for %s (%s): run flowerml registry "
                       "sync-mlflow %s", server.shown, model, failure_reason(error), model)
        return False
    return True


def _fetched(registry: Registry, version: int, name: str, folder: Path) -> Path | None:
    try:  # the version's own files too, which read_attachment keeps for its attachments
        data = registry.store.get_bytes(registry.attachment_key(version, name))
    except ObjectNotFound:
        return None
    path = folder / f"{version:06d}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _add_version(registry: Registry, mirror: ModelMirror, entry: ModelVersion, folder: Path):
    files = {name: path for name in (WEIGHTS, CARD_JSON, CARD_MD)
             if (path := _fetched(registry, entry.version, name, folder)) is not None}
    card = files.get(CARD_MD)
    description = card.read_text() if card else f"{entry.label}"
    return mirror.add_version(entry.version, files, description=description[:5000],
                              tags=version_tags(entry))


def _add_onnx(registry: Registry, mirror: ModelMirror, entry: ModelVersion, mirrored,
              folder: Path) -> bool:
    """Add the version's ONNX export (verified against its export.json) once it has one."""
    if ONNX_TAG in mirrored.tags or read_export(registry, entry.version) is None:
        return False
    data, record = load_onnx_bytes(registry, entry.version)
    path = folder / f"{entry.version:06d}" / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    mirror.add_file(mirrored, path, ONNX_TAG, record["sha256"])
    return True


def sync_aliases(registry: Registry, mirror: ModelMirror, mirrored: dict) -> dict[str, int]:
    """Set each MLflow alias to the MLflow version of the flowerml version ours points at, until
    MLflow agrees with ours as read after the last write; returns ours (alias -> version)."""
    ours: dict[str, int] = {}
    for _ in range(ALIAS_ROUNDS):
        ours = {alias: state.version for alias, state in registry.aliases().items()}
        wanted = {alias: int(mirrored[version].version) for alias, version in ours.items()
                  if version in mirrored}
        theirs = mirror.aliases()
        if all(theirs.get(alias) == number for alias, number in wanted.items()):
            return ours
        for alias, number in wanted.items():
            if theirs.get(alias) != number:
                mirror.set_alias(alias, number)
        mirrored.update({v: m for v, m in mirror.versions().items() if v not in mirrored})
    return ours
