"""The evaluation's split made ready while training runs, on CPU time training leaves idle.

A retrain evaluates on the test split right after training. Syncing that split and decoding it
(`flowerml.data.cache`: 6,149 JPEGs, ~9 CPU-seconds at 112 px, more at 224) would otherwise
start only then, on the run's critical path. `prepare_evaluation_split` does both beforehand,
at Linux's idle scheduling class (`flowerml.core.priority`): it runs on the cycles training
leaves (the child's start and imports, its checkpoints, a GPU host's idle cores) and yields to
training for the rest, so training is not slowed. The preprocessing is the one the new run will
record, judged from its `--weights` (`expected_preprocessing`); evaluation finds the cache built,
or waits on its lock for the rest, and a wrong guess only costs idle time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerml.core.priority import idle_priority_available, run_when_idle
from flowerml.data.loaders import prepare_eval_split
from flowerml.data.manifest import resolve_dataset
from flowerml.io.storage import Store
from flowerml.models.weights import expected_preprocessing


@dataclass(frozen=True)
class PreparedSplit:
    """What `prepare_evaluation_split` did: the images it decoded (0: the cache was there
    already), in how long, or why it did nothing."""

    split: str
    images: int = 0
    decoded: int = 0
    seconds: float = 0.0
    resize: int | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "images": self.images, "decoded": self.decoded,
                "seconds": round(self.seconds, 2), "resize": self.resize,
                "skipped": self.skipped}


def prepare_evaluation_split(store: Store, dataset: str, version: str, cache_dir: Path, *,
                             arch: str, weights: str, image_size: int,
                             split: str = "test") -> PreparedSplit:
    """Sync `split` of `dataset@version` and decode it as a run of `arch` trained with
    `--weights weights` at `image_size` will be evaluated, at the idle priority; skipped
    where the platform cannot lower one thread alone (it would compete with training)."""
    if not idle_priority_available():
        return PreparedSplit(split, skipped="no per-thread idle priority on this platform: "
                                            "the evaluation decodes the split itself")
    preprocessing = expected_preprocessing(weights, arch, image_size)
    started = time.perf_counter()

    def prepare():
        published = resolve_dataset(store, dataset, version)
        return prepare_eval_split(store, published, cache_dir, split=split,
                                  image_size=image_size, preprocessing=preprocessing)

    decoded = run_when_idle(prepare, name=f"prepare-{split}")
    return PreparedSplit(split, images=len(decoded), decoded=decoded.decoded,
                         seconds=time.perf_counter() - started, resize=preprocessing.resize)
