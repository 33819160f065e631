"""The deployments' pull step: which flowerml a worker runs, and settings that would lose data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.deploy_steps import relative_path_warnings, use_installed_package


def test_the_step_reports_the_installed_package(capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWERML_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    outputs = use_installed_package()
    assert (Path(outputs["flowerml_location"]) / "flows" / "retrain.py").is_file()
    assert f"flows from flowerml {outputs['flowerml_version']}" in capsys.readouterr().out
    assert "directory" not in outputs  # the run's working directory stays Prefect's choice


def test_relative_worker_paths_are_warned_about(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWERML_STORE", "./flowerml-store")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", "cache")
    warnings = relative_path_warnings()
    assert len(warnings) == 2
    assert "FLOWERML_STORE is the relative path './flowerml-store'" in warnings[0]
    assert "FLOWERML_CACHE_DIR is the relative path 'cache'" in warnings[1]
    monkeypatch.setenv("FLOWERML_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    assert relative_path_warnings() == []
