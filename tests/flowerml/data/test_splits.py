"""Parsing and validating imagelabels.mat and setid.mat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from flowerml.core.errors import LabelsError, SourceError
from flowerml.data.splits import read_official_split


def write_mats(folder: Path, labels: list[int], trnid: list[int], valid: list[int],
               tstid: list[int], drop: str | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    label_content = {"labels": np.array([labels], dtype=np.uint8)}
    setid = {"trnid": np.array([trnid], dtype=np.uint16), "valid": np.array([valid], np.uint16),
             "tstid": np.array([tstid], dtype=np.uint16)}
    label_content.pop(drop, None)
    setid.pop(drop, None)
    scipy.io.savemat(folder / "imagelabels.mat", label_content)
    scipy.io.savemat(folder / "setid.mat", setid)
    return folder / "imagelabels.mat", folder / "setid.mat"


def test_reads_the_official_layout(tmp_path: Path) -> None:
    paths = write_mats(tmp_path, [2, 1, 2, 1, 3, 3], [4, 1], [3, 5], [6, 2])
    split = read_official_split(*paths)
    assert split.labels == (2, 1, 2, 1, 3, 3)
    assert split.splits == {"train": (1, 4), "valid": (3, 5), "test": (2, 6)}
    assert split.num_classes == 3 and split.num_images == 6
    assert split.label_of(5) == 3 and split.split_of()[6] == "test"


def test_synthetic_archive_parses(synthetic_source: Path) -> None:
    split = read_official_split(synthetic_source / "imagelabels.mat",
                                synthetic_source / "setid.mat")
    assert split.num_images == 24 and split.num_classes == 4
    assert sum(len(ids) for ids in split.splits.values()) == 24


@pytest.mark.parametrize(("key", "file"), [("labels", "imagelabels.mat"), ("valid", "setid.mat"),
                                           ("tstid", "setid.mat")])
def test_missing_key_is_named(tmp_path: Path, key: str, file: str) -> None:
    paths = write_mats(tmp_path, [1, 2, 1], [1], [2], [3], drop=key)
    with pytest.raises(LabelsError, match=f"{file}: missing key '{key}'"):
        read_official_split(*paths)


@pytest.mark.parametrize("bad", [0, 103])
def test_labels_out_of_range(tmp_path: Path, bad: int) -> None:
    labels = np.array([[1, bad, 2]], dtype=np.int32)
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    _, setid = write_mats(tmp_path / "s", [1, 1, 1], [1], [2], [3])
    with pytest.raises(LabelsError, match=f"imagelabels.mat: key 'labels' has values out of "
                                          f"range 1..102 \\(e.g. {bad}\\)"):
        read_official_split(tmp_path / "imagelabels.mat", setid)


def test_id_in_two_splits(tmp_path: Path) -> None:
    paths = write_mats(tmp_path, [1, 2, 1, 2], [1, 2], [2], [3, 4])
    with pytest.raises(LabelsError, match="setid.mat: image id 2 appears more than once "
                                          "\\(in trnid, valid\\)"):
        read_official_split(*paths)


def test_id_outside_image_count(tmp_path: Path) -> None:
    paths = write_mats(tmp_path, [1, 2, 1], [1], [2], [3, 9])
    with pytest.raises(LabelsError, match="key 'tstid' has image id 9 outside 1..3"):
        read_official_split(*paths)


def test_not_a_mat_file(tmp_path: Path) -> None:
    (tmp_path / "imagelabels.mat").write_bytes(b"garbage" * 30)
    _, setid = write_mats(tmp_path / "s", [1], [1], [1], [1])
    with pytest.raises(SourceError, match="imagelabels.mat: is not a MATLAB 5 .mat file"):
        read_official_split(tmp_path / "imagelabels.mat", setid)
