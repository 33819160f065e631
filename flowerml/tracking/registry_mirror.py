"""MLflow's registered model `<name>` as a mirror of our registry's model `<name>`: one MLflow
model version per flowerml version, and the same aliases.

Each flowerml version's files (model.safetensors, card.json, card.md, the ONNX export once there
is one) are the artifacts of an MLflow run of its own (experiment `flowerml/registry/<name>`, run
name `<name>:<NNNNNN>`), and its MLflow model version is created from them with the card as
description and tags `flowerml.version` (the map flowerml version -> MLflow version: MLflow
numbers its versions itself), `flowerml.sha256` and `flowerml.flowerml_version`. Everything here
is idempotent: what MLflow already holds is left alone, and two mirrors that raced to create the
same version keep the lowest-numbered one. Which versions and aliases to mirror is the
registry's (`flowerml.registry.mlflow_sync`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowerml.tracking.server import TrackingServer, public_value

VERSION_TAG = "flowerml.version"
ONNX_TAG = "flowerml.onnx_sha256"


class ModelMirror:
    """MLflow's registered model `name` on `server`."""

    def __init__(self, server: TrackingServer, name: str) -> None:
        self.server = server
        self.name = name

    @property
    def client(self) -> Any:
        return self.server.client

    def ensure_model(self, description: str) -> None:
        """Create the registered model when MLflow has none of that name."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, tags={"flowerml.model": self.name}, description=description)
            except MlflowException:
                self.client.get_registered_model(self.name)  # created meanwhile: fine

    def versions(self) -> dict[int, Any]:
        """MLflow's model versions by the flowerml version they mirror (the lowest-numbered
        when two mirror the same one), each with `.version` (MLflow's number) and `.tags`."""
        found: dict[int, Any] = {}
        for version in self.client.search_model_versions(f"name = '{self.name}'"):
            ours = version.tags.get(VERSION_TAG)
            if ours is None or not ours.isdigit():
                continue
            kept = found.get(int(ours))
            if kept is None or int(version.version) < int(kept.version):
                found[int(ours)] = version
        return found

    def add_version(self, version: int, files: Mapping[str, Path], *, description: str,
                    tags: Mapping[str, Any]) -> Any:
        """MLflow's version of flowerml version `version`: its run's artifacts `files` (by
        name), then the model version; one created meanwhile by another mirror wins."""
        experiment_id = self.server.experiment_id(f"flowerml/registry/{self.name}")
        run = self.client.create_run(experiment_id, run_name=f"{self.name}:{version:06d}",
                                     tags={"flowerml.model": self.name,
                                           VERSION_TAG: str(version)})
        run_id = run.info.run_id
        for path in files.values():
            self.client.log_artifact(run_id, str(path), "model")
        self.client.set_terminated(run_id)
        shown = {key: shown for key, value in {**tags, VERSION_TAG: version}.items()
                 if value is not None and (shown := public_value(key, value)) is not None}
        created = self.client.create_model_version(
            self.name, f"{run.info.artifact_uri}/model", run_id=run_id, tags=shown,
            description=description)
        kept = self.versions().get(version)
        if kept is not None and int(kept.version) != int(created.version):
            self.client.delete_model_version(self.name, created.version)  # a racer was first
            return kept
        return created

    def add_file(self, mirrored: Any, path: Path, tag: str, value: str) -> None:
        """Add `path` to a mirrored version's artifacts (a file its flowerml version gained
        later: the ONNX export) and record it in tag `tag`."""
        self.client.log_artifact(mirrored.run_id, str(path), "model")
        self.client.set_model_version_tag(self.name, mirrored.version, tag, value)

    def aliases(self) -> dict[str, int]:
        """MLflow's aliases of the model: alias -> MLflow version number."""
        model = self.client.get_registered_model(self.name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def set_alias(self, alias: str, mlflow_version: int) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(mlflow_version))
