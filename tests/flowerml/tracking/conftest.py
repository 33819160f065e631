"""The tracking tests' MLflow server: one real `mlflow server` (sqlite, artifacts in a temporary
folder, 127.0.0.1) for the whole session, shared by every test here (each uses its own run ids
and model names)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.mlflow_servers import MlflowServer, mlflow_server


@pytest.fixture(scope="session")
def mlflow_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def mlflow_client(mlflow_tracking: MlflowServer):
    """An MLflow client of the session's server (a test that killed it has started it again)."""
    from mlflow import MlflowClient

    if mlflow_tracking.process is None or mlflow_tracking.process.poll() is not None:
        mlflow_tracking.start()
    return MlflowClient(tracking_uri=mlflow_tracking.url, registry_uri=mlflow_tracking.url)
