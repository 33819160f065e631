"""The optional parts of the install (pyproject's extras) and the one error a missing one is.

The core install runs everything `flowerml retrain` does (ingest, train, evaluate, register,
export to ONNX with its parity check, promote) and every library command. An extra adds what
only some installs need:

- `dask`: prefect-dask and distributed, to score shards on a Dask cluster
  (`flowerml score --dask-address`, `python -m flows.score --dask-address`, the score-images
  flow's `dask_address`).
- `mlflow`: mirror runs and registry versions to an MLflow tracking server (`--mlflow URI`,
  `FLOWERML_MLFLOW_URI`); flowerml.tracking imports it lazily and raises this module's
  `MissingExtra` itself, so a run without a tracking URI never needs it.

`require_extra` is called where such a feature starts, before anything is listed or written: a
missing extra is one line naming the `pip install` to run (a `UserError`: exit code 2).
"""

from __future__ import annotations

import importlib

from flowerml.core.errors import UserError

EXTRAS: dict[str, tuple[str, ...]] = {"dask": ("distributed", "prefect_dask")}
"""Each extra's import names (pyproject.toml lists their distributions)."""


class MissingExtra(UserError):
    """A feature whose extra is not installed."""


def require_extra(extra: str, feature: str) -> None:
    """Import every module of `extra`; `MissingExtra` naming `feature` and the `pip install`
    to run when one of them cannot be imported."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(f"{feature} needs the {extra} extra: "
                               f"pip install 'flowerml[{extra}]'") from None
