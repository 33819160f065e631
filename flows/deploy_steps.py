"""Deployment steps that deploy/prefect.yaml names: code that runs on a worker before a flow.

The flows ship inside the installed flowerml package, so there is nothing to pull; the step
says which flowerml the worker will run, which is what an operator needs when a worker lags
behind the deployments.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def use_installed_package() -> dict[str, str]:
    """Report the installed flowerml (version, location) that the run's flows come from."""
    import flows

    try:
        installed = version("flowerml")
    except PackageNotFoundError:
        installed = "not installed as a package"
    location = str(Path(flows.__file__).resolve().parent.parent)
    print(f"flows from flowerml {installed} at {location}")
    return {"flowerml_version": installed, "flowerml_location": location}
