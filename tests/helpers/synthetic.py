"""The session's synthetic data: archives, their ingests and tiny trained runs, each built once
for all xdist workers, and the specs and names the tests know them by."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from flowerml.core.recipes import TrainConfig, build_config
from flowerml.data.manifest import PublishedDataset, resolve_dataset
from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from tests.helpers.stores import StoreAndCache, copy_tree

DATASET = "flowers102"

SMALL_SPEC = SyntheticSpec(classes=4, per_class=6, image_size=48, seed=1)
"""The archive of `synthetic_source`: 4 classes x 6 images (2 train, 2 valid, 2 test), 48 px."""

TINY_SPEC = SyntheticSpec(classes=4, per_class=12, image_size=56, seed=5)
"""The archive of the tiny run: 4 classes x 12 images (3 train, 3 valid, 6 test), 56 px."""

TINY_RUN = "tiny"


def tiny_config() -> TrainConfig:
    """The tiny run's training: the demo recipe (ResNet-18, no weights), one epoch at 40 px."""
    return build_config("demo", epochs=1, image_size=40, batch_size=8)


class RegisteredRun(NamedTuple):
    """The tiny run evaluated, registered as flowers102:1 and made production."""

    store: LocalStore
    cache: Path
    registry: Registry
    metrics: dict


def spec_name(spec: SyntheticSpec) -> str:
    return (f"{spec.classes}x{spec.per_class}-{spec.image_size}px-seed{spec.seed}"
            f"-q{spec.jpeg_quality}")


class SyntheticData:
    """Synthetic archives, their ingests, tiny trained runs and their registrations, each built
    once per session.

    Each is built on first use under its own folder, named by what it is, and returned as a
    pristine path that no test may change: a test that changes things works on `copy(...)`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def once(self, name: str, build: Callable[[Path], object]) -> Path:
        """`root/name`, built by `build(folder)` the first time any xdist worker asks for it
        (the others wait on its lock file, then use it)."""
        folder, built = self.root / name, self.root / f"{name}.built"
        if built.exists():
            return folder
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                build(folder)
                built.touch()  # beside the folder, which holds only what `build` made
        return folder

    def source(self, spec: SyntheticSpec) -> Path:
        """The three source files of `spec`'s archive (read-only: damage a copy)."""
        return self.once(f"source-{spec_name(spec)}",
                         lambda folder: write_synthetic_archive(folder, spec))

    def published(self, spec: SyntheticSpec) -> Path:
        """A folder with `store/` (`spec`'s archive ingested as flowers102) and `cache/`."""
        from flowerml.data.ingest import ingest
        from flowerml.data.source_files import FetchOptions

        source = self.source(spec)

        def build(folder: Path) -> None:
            ingest(str(source), LocalStore(folder / "store"), DATASET, folder / "cache",
                   FetchOptions())

        return self.once(f"published-{spec_name(spec)}", build)

    def trained(self, spec: SyntheticSpec, run_id: str, config: TrainConfig) -> Path:
        """`published(spec)` plus run `run_id` trained with `config` on the CPU."""
        from flowerml.training.fit import fit

        published = self.published(spec)
        identity = json.dumps([run_id, config.to_json()], sort_keys=True).encode()

        def build(folder: Path) -> None:
            copy_tree(published, folder)
            fit(config, store=LocalStore(folder / "store"), dataset=DATASET, run_id=run_id,
                cache_dir=folder / "cache", device="cpu", workers=0)

        return self.once(f"trained-{spec_name(spec)}-{hashlib.sha256(identity).hexdigest()[:12]}",
                         build)

    def registered(self, spec: SyntheticSpec, run_id: str, config: TrainConfig) -> Path:
        """`trained(spec, run_id, config)` evaluated on its test split, registered as
        flowers102:1 and made production, with the evaluation's summary in `metrics.json`
        beside `store/` and `cache/`."""
        trained = self.trained(spec, run_id, config)

        def build(folder: Path) -> None:
            from flowerml.evaluation.inference import evaluate_run
            from flowerml.registry.release import build_card, register_run

            store, cache = self.copy(trained, folder)
            metrics = evaluate_run(store, run_id, cache_dir=cache, device="cpu",
                                   workers=0).metrics.summary()
            registry = Registry(store, DATASET)
            card = build_card(store, run_id, metrics, promote=True, reasons=["test"],
                              gate={"threshold": 0.0, "tolerance": 0.0, "force": True})
            version = register_run(registry, store, run_id, card)
            registry.set_alias("production", version.version, reason="test", forced=True)
            (folder / "metrics.json").write_text(json.dumps(metrics))

        return self.once(f"registered-{trained.name}", build)

    @staticmethod
    def copy(pristine: Path, dest: Path) -> StoreAndCache:
        """A private copy of a built folder, as its store and cache."""
        copy_tree(pristine, dest)
        return StoreAndCache(LocalStore(dest / "store", concurrency=8), dest / "cache")


def publish_copy(pristine_store: Path, store: Store) -> PublishedDataset:
    """The pristine store's objects on `store` (hard links for a LocalStore, uploads to S3),
    each dataset's manifest.json and CURRENT last, as ingest writes them."""
    if isinstance(store, LocalStore):
        copy_tree(pristine_store, store.root)
    else:
        def order(key: str) -> tuple[int, str]:
            return {"manifest.json": 1, "CURRENT": 2}.get(key.rsplit("/", 1)[-1], 0), key

        for key in sorted((info.key for info in LocalStore(pristine_store).list("")), key=order):
            store.put_file(key, pristine_store / key)
    return resolve_dataset(store, DATASET)
