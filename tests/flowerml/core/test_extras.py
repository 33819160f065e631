"""flowerml.core.extras: a feature whose extra is not installed is one line naming the `pip install`
to run, exit code 2, at every entry point that needs it, before anything is listed or written;
the extras it knows are pyproject's, and `dev` (what `make test` installs) pulls in each."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowerml.core.errors import UserError
from flowerml.core.extras import EXTRAS, MissingExtra, require_extra

ROOT = Path(__file__).resolve().parents[3]
DASK_MISSING = "needs the dask extra: pip install 'flowerml[dask]'"
# Runs `python -m MODULE ARGS` with the dask extra's modules unimportable, as in an install
# without the extra (None in sys.modules makes `import` raise ImportError).
WITHOUT_DASK = ("import runpy, sys\n"
                "for name in ('distributed', 'prefect_dask'):\n"
                "    sys.modules[name] = None\n"
                "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def without_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXTRAS["dask"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_a_missing_extra_is_one_line_naming_the_pip_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_extra("dask", "--dask-address")  # installed here (the dev extra pulls it in)
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(MissingExtra) as err:
        require_extra("dask", "--dask-address")
    assert str(err.value) == f"--dask-address {DASK_MISSING}"
    assert isinstance(err.value, UserError) and err.value.kind == "bad-input"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no traceback chain


def test_the_extras_are_pyprojects_and_dev_installs_each() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        listed = {requirement.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                  for requirement in optional[extra]}
        provided = {dist.lower() for module in modules for dist in distributions[module]}
        assert listed == provided, extra
        assert f"flowerml[{extra}]" in optional["dev"]


# `flowerml score --dask-address` (with and without --json) and `python -m flows.score
# --dask-address` (no --json: its summary is JSON already).
@pytest.mark.parametrize(("module", "as_json"),
                         [("flows.cli", False), ("flows.cli", True), ("flows.score", False)])
def test_score_on_dask_without_the_extra_is_one_line(module: str, as_json: bool,
                                                     tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    command = ["score"] if module == "flows.cli" else []
    command += [str(photos), "--output", str(tmp_path / "scores"),
                "--dask-address", "tcp://127.0.0.1:8786"] + (["--json"] if as_json else [])
    done = subprocess.run([sys.executable, "-c", WITHOUT_DASK, module, *command], cwd=ROOT,
                          env={**_env(), "FLOWERML_STORE": str(tmp_path / "store")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == f"flowerml: error: --dask-address {DASK_MISSING}\n"
    if as_json:
        assert json.loads(done.stdout.splitlines()[-1]) == {
            "error": f"--dask-address {DASK_MISSING}", "kind": "bad-input"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]  # nothing written


def test_the_score_flow_with_dask_address_refuses_before_listing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The score-images flow (a deployment's run with `dask_address`): refused before its
    input is listed."""
    from flows import score

    def no_listing(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the input was listed")

    monkeypatch.setattr(score, "plan_task", no_listing)
    without_dask(monkeypatch)
    params = score.ScoreParams(input=str(tmp_path / "photos"), output=str(tmp_path / "scores"),
                               dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(MissingExtra) as err:
        score.score_images.fn(params)
    assert str(err.value) == f"dask_address {DASK_MISSING}"
    assert list(tmp_path.iterdir()) == []


def _env() -> dict[str, str]:
    import os

    return {name: value for name, value in os.environ.items()
            if not name.startswith("FLOWERML_")}
