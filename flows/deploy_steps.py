"""Deployment steps that deploy/prefect.yaml names: code that runs on a worker before a flow.

The flows ship inside the installed flowerml package, so there is nothing to pull; the step
says which flowerml the worker will run, which is what an operator needs when a worker lags
behind the deployments.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def use_installed_package() -> dict[str, str]:
    """Report the installed flowerml (version, location) that the run's flows come from, and
    warn about worker settings that would lose data in the run's temporary directory."""
    import flows

    try:
        installed = version("flowerml")
    except PackageNotFoundError:
        installed = "not installed as a package"
    location = str(Path(flows.__file__).resolve().parent.parent)
    print(f"flows from flowerml {installed} at {location}")
    for warning in relative_path_warnings():
        print(f"WARNING: {warning}")
    return {"flowerml_version": installed, "flowerml_location": location}


def relative_path_warnings() -> list[str]:
    """A worker starts each run in a temporary directory that it deletes afterwards: a relative
    FLOWERML_STORE or FLOWERML_CACHE_DIR would live (and die) there."""
    from flowerml.settings import load_settings

    settings = load_settings()
    warnings = []
    if "://" not in settings.store and not Path(settings.store).is_absolute():
        warnings.append(f"FLOWERML_STORE is the relative path {settings.store!r}: this run's "
                        "data and models land in its temporary directory unless the run sets "
                        "params.store; give the worker an absolute path or an s3:// URI")
    if not Path(settings.cache_dir).is_absolute():
        warnings.append(f"FLOWERML_CACHE_DIR is the relative path {str(settings.cache_dir)!r}: "
                        "every run downloads and decodes again; give the worker an absolute path")
    return warnings
