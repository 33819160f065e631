"""Adding labelled images to a published dataset (flowerml/data/add.py): the child version, its
lineage, only the new images uploaded, the same add twice, leakage, a killed add resumed and
racing adds, on LocalStore, moto and SeaweedFS."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from flowerml.data.add import add_images
from flowerml.data.manifest import (
    PublishedDataset,
    current_key,
    manifest_key,
    read_manifest,
    resolve_dataset,
)
from flowerml.data.sync import sync_split
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from tests.helpers.additions import class_folders, copy_published_image, csv_list, jsonl_list
from tests.helpers.forked_commands import fork_call, reaped
from tests.helpers.stores import store_keys
from tests.helpers.synthetic import DATASET, SMALL_SPEC, SyntheticData, publish_copy


def test_folder_addition_publishes_a_child_on_top_of_current(
        store: Store, published: PublishedDataset, tmp_path: Path) -> None:
    source = class_folders(tmp_path / "new", {"2": 2, "003": 1, "Sweet PEA": 1})
    result = add_images(store, DATASET, str(source), tmp_path / "cache")
    assert result.published and result.parent == published.version
    assert result.version != published.version
    assert result.added == {"train": {"002": 2, "003": 1, "004": 1}}
    assert result.uploaded == 4 and result.uploaded_bytes == sum(
        p.stat().st_size for p in source.rglob("*.jpg"))
    child = resolve_dataset(store, DATASET)  # CURRENT moved, and the manifest checks out
    assert child.version == result.version
    for split in ("valid", "test"):  # only train grew: every model is gated on the same test
        assert child.split_files(split) == published.split_files(split)
    assert len(child.split_files("train")) == len(published.split_files("train")) + 4
    manifest = read_manifest("m", store.get_bytes(manifest_key(DATASET, child.version)))
    assert manifest.parent == published.version
    assert manifest.addition.source == str(source)
    assert manifest.addition.added == result.added
    # Only the new images are in the child's folder; the parent's stay where they were.
    assert len(store_keys(store, f"datasets/{DATASET}/{child.version}/train/")) == 4
    synced = sync_split(store, child, "train", tmp_path / "cache")
    assert len(list(synced.rglob("*.jpg"))) == len(child.split_files("train"))


def test_the_same_add_twice_is_the_same_version_and_uploads_nothing(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path) -> None:
    source = str(class_folders(tmp_path / "new", {"1": 2}))
    first = add_images(local_store, DATASET, source, tmp_path / "cache")
    keys = store_keys(local_store)
    current = local_store.get_bytes(current_key(DATASET))
    again = add_images(local_store, DATASET, source, tmp_path / "cache2")
    assert (again.published, again.version, again.uploaded) == (False, first.version, 0)
    assert [item["path"] for item in again.already_present] == sorted(
        str(p) for p in Path(source).rglob("*.jpg"))
    assert store_keys(local_store) == keys
    assert local_store.get_bytes(current_key(DATASET)) == current


def test_images_of_other_splits_are_leakage_and_of_the_same_split_already_present(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path) -> None:
    source = class_folders(tmp_path / "new", {"1": 1})
    for split in ("train", "valid", "test"):
        copy_published_image(local_store, local_published, split, source / "1" / f"{split}.jpg")
    (source / "1" / "broken.jpg").write_bytes(b"not a jpeg")
    result = add_images(local_store, DATASET, str(source), tmp_path / "cache", split="valid")
    assert result.added == {"valid": {"001": 1}}
    shown = {Path(item["path"]).name: item["key"] for item in result.leakage}
    assert shown == {"train.jpg": local_published.split_files("train")[0].key,
                     "test.jpg": local_published.split_files("test")[0].key}
    assert [Path(item["path"]).name for item in result.already_present] == ["valid.jpg"]
    assert [Path(item["path"]).name for item in result.rejected] == ["broken.jpg"]
    manifest = read_manifest("m", local_store.get_bytes(manifest_key(DATASET, result.version)))
    assert len(manifest.addition.leakage) == 2 and len(manifest.addition.rejected) == 1
    assert resolve_dataset(local_store, DATASET).split_files("test") == \
        local_published.split_files("test")


def test_csv_and_jsonl_lists_with_local_and_s3_paths(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        s3_store: Store, s3_options) -> None:
    images = class_folders(tmp_path / "lists", {"a": 3})
    s3_store.put_file("inbox/remote.jpg", images / "a" / "new_2.jpg")
    remote = s3_store.location("inbox/remote.jpg")
    listed = csv_list(tmp_path / "lists" / "labels.csv",
                      [("a/new_0.jpg", "1"), (str(images / "a" / "new_1.jpg"), "Sweet Pea")])
    result = add_images(local_store, DATASET, str(listed), tmp_path / "cache")
    assert result.added == {"train": {"001": 1, "004": 1}}
    lines = jsonl_list(tmp_path / "lists" / "more.jsonl",
                       [{"path": "a/new_0.jpg", "label": 1}, {"path": remote, "label": "02"}])
    more = add_images(local_store, DATASET, str(lines), tmp_path / "cache", s3=s3_options)
    assert more.added == {"train": {"002": 1}} and more.parent == result.version
    assert len(more.already_present) == 1


def test_an_s3_prefix_of_class_folders(local_store: LocalStore,
                                       local_published: PublishedDataset, tmp_path: Path,
                                       s3_store: Store, s3_options) -> None:
    folders = class_folders(tmp_path / "new", {"001": 1, "canterbury bells": 2})
    for path in folders.rglob("*.jpg"):
        s3_store.put_file(f"inbox/{path.relative_to(folders).as_posix()}", path)
    result = add_images(local_store, DATASET, s3_store.location("inbox"), tmp_path / "cache",
                        s3=s3_options)
    assert result.added == {"train": {"001": 1, "003": 2}}


def add_then_die(store_root: Path, source: str, cache: Path) -> None:
    """`add_images` onto a LocalStore that SIGKILLs its own process at the third image
    uploaded; run in a child process."""
    uploads = 0
    put_bytes = LocalStore.put_bytes

    def put_then_die(self: LocalStore, key: str, data: bytes, **options) -> str:
        nonlocal uploads
        if "/train/" in key:
            uploads += 1
            if uploads == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return put_bytes(self, key, data, **options)

    LocalStore.put_bytes = put_then_die
    add_images(LocalStore(store_root, concurrency=1), DATASET, source, cache)


def test_a_sigkilled_add_resumes(local_store: LocalStore, local_published: PublishedDataset,
                                 tmp_path: Path) -> None:
    """The add is killed in a child process forked from this one (flowerml is imported
    already); the resume runs here."""
    source = str(class_folders(tmp_path / "new", {"1": 3, "2": 3}))
    killed = fork_call(lambda: add_then_die(local_store.root, source, tmp_path / "cache"),
                       dict(os.environ), tmp_path / "child")
    with reaped([killed]):
        killed.wait(timeout=120)
    assert killed.returncode == -9, killed.stderr()
    assert resolve_dataset(local_store, DATASET).version == local_published.version
    resumed = add_images(local_store, DATASET, source, tmp_path / "cache")
    assert resumed.published and resumed.uploaded == 4  # 2 landed before the kill
    child = resolve_dataset(local_store, DATASET)
    assert child.version == resumed.version
    assert len(child.split_files("train")) == len(local_published.split_files("train")) + 6
    assert not [p for p in local_store.root.rglob(".tmp-*")]


@pytest.mark.parametrize("store_fixture", [
    "local_store", "s3_store",
    pytest.param("seaweedfs_store", marks=pytest.mark.slow)])  # a SeaweedFS server
def test_racing_adds_both_land(store_fixture: str, request: pytest.FixtureRequest,
                               synthetic_data: SyntheticData, tmp_path: Path) -> None:
    store = request.getfixturevalue(store_fixture)
    base = publish_copy(synthetic_data.published(SMALL_SPEC) / "store", store)
    sources = [str(class_folders(tmp_path / f"new{i}", {str(i + 1): 2}, seed=i + 1))
               for i in range(3)]
    barrier = threading.Barrier(len(sources))
    results, errors = [], []

    def add(source: str) -> None:
        barrier.wait()
        try:
            results.append(add_images(store, DATASET, source, tmp_path / f"cache{source[-1]}"))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=add, args=(s,)) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    final = resolve_dataset(store, DATASET)
    assert len(final.split_files("train")) == len(base.split_files("train")) + 6
    assert final.split_files("test") == base.split_files("test")
    assert len(results) == len(sources) and all(result.published for result in results)
    chain, version = [], final.version
    while version != base.version:  # each add landed on top of another: one chain, none lost
        chain.append(version)
        version = read_manifest("m", store.get_bytes(manifest_key(DATASET, version))).parent
    assert len(chain) == len(sources)
