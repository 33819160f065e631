"""The official Flowers-102 split, read from imagelabels.mat and setid.mat and validated.

Image ids and labels are 1-based in the .mat files; they stay 1-based here, as in the archive's
file names, so nothing is off by one between the files and the published keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from flowerml.core.errors import LabelsError
from flowerml.data.archive import sniff_mat
from flowerml.data.flowers import NUM_CLASSES, SPLIT_KEYS


@dataclass(frozen=True)
class OfficialSplit:
    """Label of every image, and which images each split holds (1-based ids, ascending)."""

    labels: tuple[int, ...]
    splits: dict[str, tuple[int, ...]]

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return max(self.labels)

    def label_of(self, image_id: int) -> int:
        return self.labels[image_id - 1]

    def split_of(self) -> dict[int, str]:
        return {i: split for split, ids in self.splits.items() for i in ids}


def load_mat_vector(path: Path, key: str) -> np.ndarray:
    """A 1-D integer vector stored under `key`, with errors naming the file and key."""
    sniff_mat(path)
    try:
        content = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises assorted types for corrupt files
        raise LabelsError(f"{path.name}: cannot be read as a .mat file ({error})") from None
    if key not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise LabelsError(f"{path.name}: missing key '{key}' (found: {', '.join(found) or 'none'})")
    values = np.asarray(content[key]).ravel()
    if values.size == 0:
        raise LabelsError(f"{path.name}: key '{key}' is empty")
    if not np.all(np.isfinite(values.astype(np.float64))) or np.any(values != np.round(values)):
        raise LabelsError(f"{path.name}: key '{key}' holds non-integer values")
    return values.astype(np.int64)


def read_official_split(labels_path: Path, setid_path: Path) -> OfficialSplit:
    """Parse and cross-check the two .mat files into the official train/valid/test split."""
    labels = load_mat_vector(labels_path, "labels")
    bad = labels[(labels < 1) | (labels > NUM_CLASSES)]
    if bad.size:
        raise LabelsError(f"{labels_path.name}: key 'labels' has values out of range "
                          f"1..{NUM_CLASSES} (e.g. {int(bad[0])})")
    splits = {split: load_mat_vector(setid_path, key) for split, key in SPLIT_KEYS.items()}
    check_split_ids(setid_path.name, splits, len(labels))
    return OfficialSplit(
        labels=tuple(int(v) for v in labels),
        splits={split: tuple(sorted(int(v) for v in ids)) for split, ids in splits.items()},
    )


def check_split_ids(file_name: str, splits: dict[str, np.ndarray], num_images: int) -> None:
    """Every id within 1..num_images, and in exactly one split."""
    for split, ids in splits.items():
        key = SPLIT_KEYS[split]
        outside = ids[(ids < 1) | (ids > num_images)]
        if outside.size:
            raise LabelsError(f"{file_name}: key '{key}' has image id {int(outside[0])} outside "
                              f"1..{num_images} (the number of labels)")
    counts = Counter(int(i) for ids in splits.values() for i in ids)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        where = [SPLIT_KEYS[s] for s, ids in splits.items() if repeated[0] in ids]
        raise LabelsError(f"{file_name}: image id {repeated[0]} appears more than once "
                          f"(in {', '.join(where)}); {len(repeated)} id(s) repeated in all")
