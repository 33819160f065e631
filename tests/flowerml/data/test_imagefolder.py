"""A dataset of one's own classes (flowerml/data/imagefolder.py): train/ valid/ test/ of class
folders or class folders split by ratios, published with the folder names as classes, on
LocalStore and moto, from a local folder or an s3:// prefix; each bad input refused with one
line and nothing published."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from flowerml.core.errors import DataError, LeakageError, SourceError
from flowerml.data.add import add_images
from flowerml.data.imagefolder import publish_image_folder
from flowerml.data.ingest import IngestResult, ingest
from flowerml.data.manifest import (
    PublishedDataset,
    manifest_key,
    read_manifest,
    resolve_dataset,
)
from flowerml.data.source_files import FetchOptions
from flowerml.data.sync import sync_split
from flowerml.io.locations import ImageFolderLocation, parse_source
from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from tests.helpers.additions import class_folders, split_folders
from tests.helpers.stores import store_keys

DATASET = "garden"
CLASSES = ("tulip", "daisy", "Rose")  # sorted: Rose, daisy, tulip (code-point order)


def location(path: Path | str) -> ImageFolderLocation:
    where = parse_source(f"imagefolder:{path}")
    assert isinstance(where, ImageFolderLocation)
    return where


def publish(path: Path | str, store: Store, cache: Path, **options) -> tuple[
        IngestResult, tuple[str, ...]]:
    return publish_image_folder(location(path), store, DATASET, cache, **options)


def labels_by_class(published: PublishedDataset, split: str) -> Counter:
    return Counter(published.class_names[e.label - 1] for e in published.split_files(split))


def test_split_folders_publish_a_dataset_named_by_its_class_folders(
        store: Store, tmp_path: Path) -> None:
    source = split_folders(tmp_path / "mine")
    result, names = publish(source, store, tmp_path / "cache")
    assert names == ("Rose", "daisy", "tulip")
    assert result.counts == {"train": 6, "valid": 6, "test": 6}
    assert (result.uploaded, result.quarantined, result.synthetic) == (18, 0, False)
    published = resolve_dataset(store, DATASET)  # CURRENT, the manifest checks out
    assert published.version == result.version and published.class_names == names
    for split in ("train", "valid", "test"):
        assert labels_by_class(published, split) == dict.fromkeys(names, 2)
    rose = [e for e in published.split_files("test") if e.label == 1]
    assert [e.key for e in rose] == ["test/001/new_0.jpg", "test/001/new_1.jpg"]
    assert store.get_bytes(published.object_key(rose[0])) == (
        source / "test" / "Rose" / "new_0.jpg").read_bytes()
    manifest = read_manifest("m", store.get_bytes(manifest_key(DATASET, result.version)))
    assert manifest.sources == {"imagefolder": {"path": f"imagefolder:{source}",
                                                "split_ratios": [], "seed": None}}
    assert [(c.label, c.dir, c.name) for c in manifest.classes] == [
        (1, "001", "Rose"), (2, "002", "daisy"), (3, "003", "tulip")]
    synced = sync_split(store, published, "train", tmp_path / "cache")
    assert len(list((synced / "train").rglob("*.jpg"))) == 6


def test_the_same_folder_again_is_the_same_version_and_uploads_nothing(
        local_store: LocalStore, tmp_path: Path) -> None:
    source = split_folders(tmp_path / "mine")
    first, _ = publish(source, local_store, tmp_path / "cache")
    keys = store_keys(local_store)
    again, _ = publish(source, local_store, tmp_path / "cache2")
    assert (again.version, again.uploaded, again.skipped, again.replaced) == (
        first.version, 0, 18, None)
    assert store_keys(local_store) == keys
    # The same images under a renamed class folder are another dataset version.
    (source / "train" / "tulip").rename(source / "train" / "tulips")
    for split in ("valid", "test"):
        (source / split / "tulip").rename(source / split / "tulips")
    renamed, names = publish(source, local_store, tmp_path / "cache")
    assert names[-1] == "tulips" and renamed.version != first.version
    assert renamed.replaced == first.version and renamed.uploaded == 18


def test_class_folders_are_split_by_class_and_the_same_seed_gives_the_same_split(
        local_store: LocalStore, tmp_path: Path) -> None:
    source = class_folders(tmp_path / "flat", {"tulip": 10, "daisy": 20, "Rose": 5})
    result, names = publish(source, local_store, tmp_path / "cache", split_ratios="0.6,0.2,0.2",
                            seed=7)
    published = resolve_dataset(local_store, DATASET)
    assert labels_by_class(published, "train") == {"Rose": 3, "daisy": 12, "tulip": 6}
    assert labels_by_class(published, "valid") == {"Rose": 1, "daisy": 4, "tulip": 2}
    assert labels_by_class(published, "test") == {"Rose": 1, "daisy": 4, "tulip": 2}
    assert names == ("Rose", "daisy", "tulip") and result.counts["train"] == 21
    again, _ = publish(source, local_store, tmp_path / "cache", split_ratios="0.6,0.2,0.2",
                       seed=7)
    assert (again.version, again.uploaded) == (result.version, 0)
    other, _ = publish(source, local_store, tmp_path / "cache", split_ratios="0.6,0.2,0.2",
                       seed=8)
    assert other.version != result.version and other.counts == result.counts
    manifest = read_manifest("m", local_store.get_bytes(manifest_key(DATASET, other.version)))
    assert manifest.sources["imagefolder"]["split_ratios"] == [0.6, 0.2, 0.2]
    assert manifest.sources["imagefolder"]["seed"] == 8


def test_duplicates_in_a_class_are_published_once_and_bad_images_quarantined(
        local_store: LocalStore, tmp_path: Path) -> None:
    source = class_folders(tmp_path / "flat", {"a": 3, "b": 3})
    shutil.copy(source / "a" / "new_0.jpg", source / "a" / "copy.jpg")
    (source / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    result, _ = publish(source, local_store, tmp_path / "cache", split_ratios="0.34,0.33,0.33")
    assert result.counts == {"train": 2, "valid": 2, "test": 2}
    assert result.quarantined == 1
    manifest = read_manifest("m", local_store.get_bytes(manifest_key(DATASET, result.version)))
    assert manifest.quarantined_images == ["b/broken.jpg"]


def test_an_s3_prefix_of_split_folders(s3_store: S3Store, s3_options: S3Options,
                                       tmp_path: Path) -> None:
    source = split_folders(tmp_path / "mine", per_split=1)
    for path in sorted(source.rglob("*.jpg")):
        s3_store.put_bytes(f"mine/{path.relative_to(source).as_posix()}", path.read_bytes())
    result, names = publish(f"s3://{s3_store.bucket}/store/mine", s3_store, tmp_path / "cache",
                            s3=s3_options)
    assert names == ("Rose", "daisy", "tulip")
    assert result.counts == {"train": 3, "valid": 3, "test": 3}
    assert resolve_dataset(s3_store, DATASET).class_names == names


def test_an_addition_on_top_takes_its_class_names(local_store: LocalStore,
                                                  tmp_path: Path) -> None:
    first, _ = publish(split_folders(tmp_path / "mine"), local_store, tmp_path / "cache")
    new = class_folders(tmp_path / "new", {"DAISY": 2}, seed=9)
    added = add_images(local_store, DATASET, str(new), tmp_path / "cache")
    assert added.published and added.parent == first.version
    assert added.added == {"train": {"002": 2}}
    assert resolve_dataset(local_store, DATASET).class_names == ("Rose", "daisy", "tulip")


def test_the_same_image_in_two_splits_is_leakage(local_store: LocalStore,
                                                 tmp_path: Path) -> None:
    source = split_folders(tmp_path / "mine")
    shutil.copy(source / "train" / "daisy" / "new_0.jpg", source / "test" / "daisy" / "x.jpg")
    with pytest.raises(LeakageError, match=r"^identical images in more than one split, "
                                           r"refusing to publish: x.jpg \(test\) = "
                                           r"new_0.jpg \(train\)$"):
        publish(source, local_store, tmp_path / "cache")
    assert store_keys(local_store) == []


def bad_inputs(root: Path) -> dict[str, tuple[Path, dict, str]]:
    """{case: (PATH, options, the message)}, each PATH written under `root`."""
    flat = class_folders(root / "flat", {"a": 2, "b": 5})
    empty_class = class_folders(root / "empty-class", {"a": 2})
    (empty_class / "b").mkdir()
    (root / "no-classes").mkdir()
    partial = split_folders(root / "partial")
    shutil.rmtree(partial / "test")
    differ = split_folders(root / "differ")
    shutil.rmtree(differ / "valid" / "daisy")
    extra = split_folders(root / "extra")
    class_folders(extra / "test", {"lily": 1}, seed=5)
    split = split_folders(root / "split")
    shown = f"imagefolder:{root}"
    return {
        "missing": (root / "nope", {}, f"{shown}/nope: folder {root}/nope does not exist"),
        "no class folders": (root / "no-classes", {"split_ratios": "0.8,0.1,0.1"},
                             f"{root}/no-classes: no class folders ({shown}/no-classes holds "
                             "one folder of images per class)"),
        "empty class": (empty_class, {"split_ratios": "0.8,0.1,0.1"},
                        f"{empty_class}/b: no images in this class folder"),
        "some splits": (partial, {}, f"{shown}/partial: has train/, valid/ but no test/ (give "
                                     "all three split folders, or class folders alone with "
                                     "--split-ratios)"),
        "split lacks a class": (differ, {}, f"{differ}/valid: no class folder 'daisy' (train/ "
                                            "has it; every split holds the same classes)"),
        "extra class": (extra, {}, f"{extra}/test/lily: not a class of train/"),
        "no ratios": (flat, {}, f"{shown}/flat: class folders without train/ valid/ test/: "
                                "give --split-ratios"),
        "ratios on splits": (split, {"split_ratios": "0.8,0.1,0.1"},
                             f"--split-ratios: {shown}/split is already split into train/"),
        "ratios sum": (flat, {"split_ratios": "0.8,0.1,0.2"},
                       "--split-ratios 0.8,0.1,0.2: the ratios sum to 1.1, not 1"),
        "ratios text": (flat, {"split_ratios": "0.8,0.2"},
                        "--split-ratios 0.8,0.2: three numbers between 0 and 1 for "
                        "train,valid,test"),
        "empty split": (flat, {"split_ratios": "0.8,0.1,0.1"},
                        f"{flat}/a: 2 usable image(s) leave valid empty at --split-ratios "
                        "0.8,0.1,0.1 (every split needs at least one image of each class)"),
    }


CASES = ("missing", "no class folders", "empty class", "some splits", "split lacks a class",
         "extra class", "no ratios", "ratios on splits", "ratios sum", "ratios text",
         "empty split")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_publishes_nothing(case: str, local_store: LocalStore,
                                                     tmp_path: Path) -> None:
    path, options, message = bad_inputs(tmp_path / "in")[case]
    with pytest.raises(DataError) as refused:
        publish(path, local_store, tmp_path / "cache", **options)
    text = str(refused.value)
    assert message in text and "\n" not in text
    assert not local_store.root.exists() or store_keys(local_store) == []


def test_flowers_102_is_never_fetched_into_a_dataset_of_ones_own_classes(
        local_store: LocalStore, tmp_path: Path, source_copy: Path) -> None:
    source = split_folders(tmp_path / "mine")
    publish(source, local_store, tmp_path / "cache")
    keys = store_keys(local_store)
    with pytest.raises(SourceError, match=re.escape(
            f"dataset '{DATASET}' holds its own classes (from imagefolder:{source}) and has no "
            f"Flowers-102 source: publish it again with flowerml ingest --source "
            f"imagefolder:{source} --dataset {DATASET}")):
        ingest(str(source_copy), local_store, DATASET, tmp_path / "cache", FetchOptions())
    assert store_keys(local_store) == keys
