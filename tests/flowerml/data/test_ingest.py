"""Ingest end to end on both stores: fetch, survey, publish, re-run, resume, refuse bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flowerml.core.errors import (
    ArchiveError,
    DatasetNotFound,
    LeakageError,
    SourceError,
)
from flowerml.core.files import sha256_hex
from flowerml.data import flowers, ingest
from flowerml.data.add import add_images
from flowerml.data.ingest import publish_split
from flowerml.data.manifest import PublishedDataset, read_current, resolve_dataset
from flowerml.data.source_files import FetchOptions
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from tests.helpers.additions import class_folders
from tests.helpers.archives import archive_members, rewrite_archive
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.forked_commands import Forked, fork_call, fork_flowerml, reaped
from tests.helpers.stores import store_keys
from tests.helpers.synthetic import DATASET


def run_ingest(source: Path | str, store: Store, cache: Path, **options) -> ingest.IngestResult:
    return ingest.ingest(str(source), store, "flowers102", cache, FetchOptions(**options))


def assert_published_byte_identical(store: Store, source: Path, result) -> dict:
    """The first ingest of `source` published all 24 images as the archive holds them, and
    CURRENT names its version; returns the manifest."""
    assert result.counts == {"train": 8, "valid": 8, "test": 8}
    assert (result.uploaded, result.skipped, result.quarantined) == (24, 0, 0)
    prefix = f"datasets/flowers102/{result.version}"
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    members = archive_members(source)
    assert len(manifest["files"]) == 24
    for entry in manifest["files"]:
        published = store.get_bytes(f"{prefix}/{entry['key']}")
        assert published == members[f"jpg/{entry['image']}"]  # never re-encoded
        assert entry["key"] == f"{entry['split']}/{entry['label']:03d}/{entry['image']}"
    current = json.loads(store.get_bytes("datasets/flowers102/CURRENT"))
    assert current["version"] == result.version
    return manifest


def test_publishes_official_split_byte_identical(store: Store, synthetic_source: Path,
                                                 tmp_path: Path) -> None:
    result = run_ingest(synthetic_source, store, tmp_path / "cache")
    manifest = assert_published_byte_identical(store, synthetic_source, result)
    assert [c["dir"] for c in manifest["classes"]] == ["001", "002", "003", "004"]
    assert manifest["classes"][0]["name"] == "pink primrose"
    assert manifest["sources"][flowers.ARCHIVE]["size"] == (
        synthetic_source / flowers.ARCHIVE).stat().st_size
    assert sorted(store_keys(store, "datasets/flowers102/raw/")) == [
        f"datasets/flowers102/raw/{n}" for n in
        ("102flowers.tgz", "imagelabels.mat", "setid.mat", "sources.json")]


def test_rerun_uploads_nothing_and_keeps_version(store: Store, synthetic_source: Path,
                                                 tmp_path: Path) -> None:
    first = run_ingest(synthetic_source, store, tmp_path / "cache")
    raw_etag = store.head("datasets/flowers102/raw/102flowers.tgz").etag
    again = run_ingest(synthetic_source, store, tmp_path / "other-cache")
    assert again.version == first.version
    assert (again.uploaded, again.skipped) == (0, 24)
    assert store.head("datasets/flowers102/raw/102flowers.tgz").etag == raw_etag


def test_different_content_gets_a_different_version(local_store: LocalStore, tmp_path: Path,
                                                    synthetic_source: Path) -> None:
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    other = tmp_path / "other"
    write_synthetic_archive(other, SyntheticSpec(classes=4, per_class=6, image_size=48, seed=2))
    first = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    second = run_ingest(other, local_store, tmp_path / "cache")
    assert first.version != second.version
    current = json.loads(local_store.get_bytes("datasets/flowers102/CURRENT"))
    assert current["version"] == second.version
    assert local_store.exists(f"datasets/flowers102/{first.version}/manifest.json")


def test_corrupt_jpeg_is_quarantined(local_store: LocalStore, source_copy: Path,
                                     tmp_path: Path) -> None:
    good = archive_members(source_copy)["jpg/image_00003.jpg"]
    rewrite_archive(source_copy, {3: good[: len(good) // 2], 5: b"not a jpeg at all"})
    result = run_ingest(source_copy, local_store, tmp_path / "cache")
    assert result.quarantined == 2
    assert sum(result.counts.values()) == 22
    prefix = f"datasets/flowers102/{result.version}"
    quarantine = json.loads(local_store.get_bytes(f"{prefix}/quarantine.json"))
    assert [q["image"] for q in quarantine] == ["image_00003.jpg", "image_00005.jpg"]
    assert "does not decode" in quarantine[0]["reason"]
    keys = store_keys(local_store, prefix)
    assert not any("image_00003" in k or "image_00005" in k for k in keys)


def test_identical_image_in_two_splits_is_refused(local_store: LocalStore, source_copy: Path,
                                                  tmp_path: Path) -> None:
    from flowerml.data.splits import read_official_split

    split = read_official_split(source_copy / flowers.LABELS, source_copy / flowers.SETID)
    train_id, test_id = split.splits["train"][0], split.splits["test"][0]
    members = archive_members(source_copy)
    rewrite_archive(source_copy, {test_id: members[f"jpg/{flowers.image_name(train_id)}"]})
    with pytest.raises(LeakageError) as caught:
        run_ingest(source_copy, local_store, tmp_path / "cache")
    assert f"{flowers.image_name(train_id)} (train)" in str(caught.value)
    assert f"{flowers.image_name(test_id)} (test)" in str(caught.value)
    assert not any(k.endswith((".jpg", "manifest.json", "CURRENT"))
                   for k in store_keys(local_store) if "/raw/" not in k)


def test_image_missing_from_archive_is_refused(local_store: LocalStore, source_copy: Path,
                                               tmp_path: Path) -> None:
    rewrite_archive(source_copy, drop={7})
    with pytest.raises(ArchiveError, match="1 image\\(s\\) named in setid.mat are missing "
                                           "from the archive \\(image_00007.jpg\\)"):
        run_ingest(source_copy, local_store, tmp_path / "cache")
    assert store_keys(local_store) == []


def test_publish_needs_fetched_sources(local_store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=f"^{local_store.root}/datasets/flowers102/raw/"
                                              "sources.json: not found; fetch the sources"):
        publish_split(local_store, "flowers102", tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# Interruption: kill -9 part-way, re-run, and the store equals an uninterrupted run's.


def listing(store: Store, prefix: str) -> dict[str, tuple[int, str]]:
    """Key -> (size, etag); S3 etags of single-part objects are their content's MD5."""
    return {info.key: (info.size, info.etag) for info in store.list(prefix)}


@pytest.mark.slow  # a child process: an ingest killed with SIGKILL, then run again
def test_killed_ingest_resumes_to_the_same_store(tmp_path: Path, moto_endpoint: str) -> None:
    import boto3

    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive
    from flowerml.io.storage import S3Options

    source = tmp_path / "src"
    write_synthetic_archive(source, SyntheticSpec(classes=6, per_class=20, image_size=32))
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    for bucket in ("interrupted", "reference"):
        client.create_bucket(Bucket=bucket)
    env = {**os.environ, "FLOWERML_S3_ENDPOINT_URL": moto_endpoint,
           "FLOWERML_TRANSFER_CONCURRENCY": "1", "FLOWERML_CACHE_DIR": str(tmp_path / "cache")}
    args = ["ingest", "--source", str(source), "--json", "--workers", "1"]

    # The child is forked from this process (flowerml is imported already): a process of its
    # own, uploading one image at a time, for the kill to land in.
    child = fork_flowerml([*args, "--store", "s3://interrupted/x"], env, tmp_path / "child")
    with reaped([child]):
        deadline = time.monotonic() + 120
        uploaded = 0
        while time.monotonic() < deadline and child.poll() is None:
            listed = client.list_objects_v2(Bucket="interrupted", Prefix="x/datasets/")
            uploaded = sum(k["Key"].endswith(".jpg") for k in listed.get("Contents", []))
            if uploaded >= 30:
                break
            time.sleep(0.02)
    assert child.returncode == -signal.SIGKILL, child.stderr()[-3000:]
    assert 30 <= uploaded < 120, "the kill must land part-way through the upload"
    interrupted = S3Store("interrupted", "x", S3Options(endpoint_url=moto_endpoint))
    assert not any(k.endswith(("manifest.json", "CURRENT")) for k in store_keys(interrupted))

    # The kill needed a child; resuming and the reference run do not.
    for bucket in ("interrupted", "reference"):
        done = invoke(*args, "--store", f"s3://{bucket}/x", env=env)
        assert done.exit_code == 0, done.output
    reference = S3Store("reference", "x", S3Options(endpoint_url=moto_endpoint))
    assert listing(interrupted, "datasets/") == listing(reference, "datasets/")


@pytest.mark.slow  # a SeaweedFS server process
def test_ingest_onto_seaweedfs(seaweedfs_store: S3Store, synthetic_source: Path,
                               tmp_path: Path) -> None:
    """One ingest onto a real S3 server: conditional writes, checksums and listing as it does
    them (moto is lenient about all three)."""
    result = run_ingest(synthetic_source, seaweedfs_store, tmp_path / "cache")
    assert_published_byte_identical(seaweedfs_store, synthetic_source, result)
    again = run_ingest(synthetic_source, seaweedfs_store, tmp_path / "other-cache")
    assert (again.version, again.uploaded, again.skipped) == (result.version, 0, 24)


def other_source(tmp_path: Path) -> Path:
    """A second synthetic archive, with other images (so another version)."""
    from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive

    folder = tmp_path / "other"
    write_synthetic_archive(folder, SyntheticSpec(classes=4, per_class=6, image_size=48, seed=2))
    return folder


def test_result_names_the_version_in_full_and_says_synthetic(store: Store, synthetic_source: Path,
                                                             tmp_path: Path) -> None:
    result = run_ingest(synthetic_source, store, tmp_path / "cache")
    prefix = f"datasets/flowers102/{result.version}"
    expected = (f"s3://{store.bucket}/store/{prefix}" if isinstance(store, S3Store)
                else f"{store.root}/{prefix}")
    assert result.location == expected and result.to_json()["location"] == expected
    assert result.synthetic and result.to_json()["synthetic"] is True
    assert json.loads(store.get_bytes(f"{prefix}/manifest.json"))["synthetic"] is True


def test_archive_without_the_marker_is_not_synthetic(local_store: LocalStore, source_copy: Path,
                                                     synthetic_source: Path,
                                                     tmp_path: Path) -> None:
    from flowerml.data.synthetic import SYNTHETIC_MARKER
    from tests.helpers.archives import rewrite_mat

    rewrite_mat(source_copy / flowers.LABELS, **{SYNTHETIC_MARKER: None})  # the real file's keys
    real_format = run_ingest(source_copy, local_store, tmp_path / "cache")
    assert not real_format.synthetic
    manifest = json.loads(local_store.get_bytes(
        f"datasets/flowers102/{real_format.version}/manifest.json"))
    assert manifest["synthetic"] is False
    # The same images with the marker are another version: the flag is part of the identity.
    assert run_ingest(synthetic_source, local_store, tmp_path / "cache").version != \
        real_format.version


def test_moving_current_says_what_it_replaced(local_store: LocalStore, synthetic_source: Path,
                                              tmp_path: Path) -> None:
    first = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    assert first.replaced is None  # nothing was current
    assert run_ingest(synthetic_source, local_store, tmp_path / "cache").replaced is None
    second = run_ingest(other_source(tmp_path), local_store, tmp_path / "cache")
    assert second.replaced == first.version and second.to_json()["replaced"] == first.version
    back = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    assert back.replaced == second.version


def test_ingest_cli_says_what_current_replaced_and_that_data_is_synthetic(
        synthetic_source: Path, tmp_path: Path) -> None:
    def ingest_line(source: Path) -> list[str]:
        result = invoke("ingest", "--source", str(source), "--store", str(tmp_path / "store"),
                        env={"FLOWERML_CACHE_DIR": str(tmp_path / "cache")})
        assert result.exit_code == 0, result.output
        return result.stdout.splitlines()

    first = ingest_line(synthetic_source)
    version = LocalStore(tmp_path / "store").get_bytes("datasets/flowers102/CURRENT")
    version = json.loads(version)["version"]
    assert first[0].startswith(f"published flowers102@{version} at "
                               f"{tmp_path / 'store'}/datasets/flowers102/{version}: ")
    assert not any("CURRENT" in line for line in first)
    assert "synthetic data (drawn by flowerml synth)" in first[-1]
    second = ingest_line(other_source(tmp_path))
    assert f"CURRENT moved from {version} to " in "\n".join(second)


def test_reingest_repairs_an_edited_manifest(local_store: LocalStore, synthetic_source: Path,
                                             tmp_path: Path) -> None:
    import hashlib

    from flowerml.core.errors import DataError
    from flowerml.data.manifest import resolve_dataset

    first = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    key = f"datasets/flowers102/{first.version}/manifest.json"
    original = local_store.get_bytes(key)
    manifest = json.loads(original)
    manifest["classes"][0]["name"] = "edited"
    manifest["files"][0]["label"] = manifest["files"][0]["label"] % 4 + 1
    manifest["files"][0]["key"] = (f"{manifest['files'][0]['split']}/"
                                   f"{manifest['files'][0]['label']:03d}/"
                                   f"{manifest['files'][0]['image']}")
    edited = json.dumps(manifest).encode()
    local_store.put_bytes(key, edited)
    local_store.put_bytes("datasets/flowers102/CURRENT", json.dumps(
        {"version": first.version, "manifest_sha256": hashlib.sha256(edited).hexdigest()}
    ).encode())
    with pytest.raises(DataError, match="its entries hash to version"):
        resolve_dataset(local_store, "flowers102")
    again = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    assert again.version == first.version and local_store.get_bytes(key) == original
    assert resolve_dataset(local_store, "flowers102").class_names[0] == "pink primrose"


def empty_folders(root: Path) -> list[Path]:
    return [Path(folder) for folder, subfolders, files in os.walk(root)
            if not subfolders and not files]


def test_refused_source_leaves_no_store_folder(source_copy: Path, tmp_path: Path) -> None:
    (source_copy / flowers.SETID).unlink()  # found missing once the store has been checked
    store = LocalStore(tmp_path / "new" / "store")
    with pytest.raises(SourceError, match=flowers.SETID):
        run_ingest(source_copy, store, tmp_path / "cache")
    assert not (tmp_path / "new").exists()


def test_leak_refusal_leaves_no_empty_folders(local_store: LocalStore, source_copy: Path,
                                              tmp_path: Path) -> None:
    from flowerml.data.splits import read_official_split

    split = read_official_split(source_copy / flowers.LABELS, source_copy / flowers.SETID)
    members = archive_members(source_copy)
    rewrite_archive(source_copy, {split.splits["valid"][0]: members[
        f"jpg/{flowers.image_name(split.splits['train'][0])}"]})
    with pytest.raises(LeakageError):
        run_ingest(source_copy, local_store, tmp_path / "cache")
    assert empty_folders(local_store.root) == []
    assert sorted(p.name for p in (local_store.root / "datasets/flowers102").iterdir()) == ["raw"]


class DiskFullAtValid(LocalStore):
    """A local store whose disk fills up as the first validation image is written: the write
    has made its folder, as a real one does, before it fails."""

    def put_bytes(self, key: str, data: bytes, **conditions) -> str:
        if "/valid/" in key:
            self._path(key).parent.mkdir(parents=True, exist_ok=True)
            raise OSError(28, "No space left on device", str(self._path(key)))
        return super().put_bytes(key, data, **conditions)


def test_a_staged_image_changed_after_the_survey_is_refused_and_nothing_published(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path) -> None:
    """Each image is checked against its surveyed sha256 as it is read for upload (on the
    upload threads): one altered since is named, and no version or CURRENT appears."""
    cache = tmp_path / "cache"
    ingest.fetch_sources(str(synthetic_source), local_store, DATASET, cache, FetchOptions())
    staged = next(cache.rglob("image_*.jpg"))
    staged.write_bytes(staged.read_bytes() + b"edited")
    with pytest.raises(SourceError, match=f"{staged.name}: staged image changed since it was "
                                          "checked; delete .* and re-run"):
        publish_split(local_store, DATASET, cache)
    assert not any(k.endswith(("manifest.json", "CURRENT")) for k in store_keys(local_store))


def test_failed_upload_leaves_no_empty_folders_and_resumes(synthetic_source: Path,
                                                           tmp_path: Path) -> None:
    failing = DiskFullAtValid(tmp_path / "store", concurrency=4)
    with pytest.raises(OSError, match="No space left"):
        run_ingest(synthetic_source, failing, tmp_path / "cache")
    assert empty_folders(failing.root) == []
    assert not any(k.endswith(("manifest.json", "CURRENT")) for k in store_keys(failing))
    resumed = run_ingest(synthetic_source, LocalStore(tmp_path / "store"), tmp_path / "cache")
    assert resumed.uploaded + resumed.skipped == 24 and resumed.uploaded < 24


def slow_ingest(source: Path) -> None:
    """`flowerml ingest --json` whose store takes a quarter of a second per image (a slow disk
    or link), so that a test can stop an ingest part-way through publishing the version. Run
    in a child process: the slow store is that process's alone."""
    from flowerml.cli import main

    put = LocalStore.put_bytes

    def put_slowly(self: LocalStore, key: str, data: bytes, **options) -> str:
        if key.endswith(".jpg"):
            time.sleep(0.25)
        return put(self, key, data, **options)

    LocalStore.put_bytes = put_slowly
    main(["ingest", "--source", str(source), "--json"])


def start_slow_ingest(source: Path, store: LocalStore, cache: Path, outputs: Path) -> Forked:
    """`slow_ingest` onto `store` in a child process (forked from this one, which has imported
    flowerml already), one slow upload at a time; returns once it is publishing (the first
    image is on the store). Its stdout and stderr go to files in `outputs`."""
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache),
           "FLOWERML_TRANSFER_CONCURRENCY": "1"}
    child = fork_call(lambda: slow_ingest(source), env, outputs, name="ingest")
    deadline = time.monotonic() + 120
    while not any((store.root / "datasets").rglob("image_*.jpg")):
        assert child.poll() is None, (child.stdout(), child.stderr())
        if time.monotonic() >= deadline:
            child.kill()
            pytest.fail("the ingest never started publishing")
        time.sleep(0.05)
    return child


def temp_files(store: LocalStore) -> list[Path]:
    return sorted(store.root.rglob(".tmp-*"))


@pytest.mark.slow  # a child process stopped by SIGTERM
def test_sigterm_stops_an_ingest_with_one_line_and_publishes_nothing(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path) -> None:
    """systemd, Kubernetes and `timeout` stop with SIGTERM: the same line and JSON as Ctrl-C,
    exit 143, the uploads under way finish or leave no temp file, and no manifest or CURRENT
    makes the half-uploaded version look published."""
    child = start_slow_ingest(synthetic_source, local_store, tmp_path / "cache",
                              tmp_path / "child")
    with reaped([child]):
        os.kill(child.pid, signal.SIGTERM)
        child.wait(timeout=60)
    stdout, stderr = child.stdout(), child.stderr()
    assert child.returncode == 143, stderr
    assert stderr == "flowerml: error: stopped by SIGTERM\n"
    assert [json.loads(line) for line in stdout.splitlines()] == [
        {"error": "stopped by SIGTERM", "kind": "stopped"}]
    assert temp_files(local_store) == []
    keys = store_keys(local_store, "datasets/")
    assert 1 <= sum(key.endswith(".jpg") for key in keys) < 24, keys
    assert not [key for key in keys if key.endswith(("manifest.json", "CURRENT"))]


@pytest.mark.slow  # a child process killed with SIGKILL
def test_a_resumed_ingest_removes_the_temp_files_a_killed_one_left(
        local_store: LocalStore, synthetic_source: Path, tmp_path: Path) -> None:
    child = start_slow_ingest(synthetic_source, local_store, tmp_path / "cache",
                              tmp_path / "child")
    child.kill()  # SIGKILL: no `finally` runs, so a write under way leaves its temp file
    image = next((local_store.root / "datasets").rglob("image_*.jpg"))
    # What a write cut short by the kill leaves beside its object (files.temp_beside's name).
    left = image.with_name(".tmp-0123456789abcdef.jpg")
    left.write_bytes(image.read_bytes()[:100])
    result = invoke("ingest", "--source", str(synthetic_source), store=local_store,
                    cache=tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert temp_files(local_store) == []
    assert "already there" in result.stdout and "uploaded 0," not in result.stdout
    published = resolve_dataset(local_store, "flowers102")  # CURRENT's, manifest verified
    assert len(published.files) == 24
    prefix = f"datasets/flowers102/{published.version}"
    assert [sha256_hex(local_store.get_bytes(f"{prefix}/{entry.key}"))
            for entry in published.files] == [entry.sha256 for entry in published.files]


def test_a_version_has_one_writer_at_a_time(local_store: LocalStore) -> None:
    """`writing_under` is a lock across processes: a second holder waits, so the temp files
    its first holder removes are never another writer's write in progress."""
    prefix = "datasets/flowers102/v1"
    local_store.put_bytes(f"{prefix}/a.jpg", b"a")
    stale = local_store.root / prefix / ".tmp-0123456789abcdef.jpg"
    stale.write_bytes(b"cut short")
    entered = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def hold() -> None:
        with local_store.writing_under(prefix):
            order.append("first")
            entered.set()
            release.wait(10)
        order.append("first released")

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(10)
    assert not stale.exists()  # swept by the first holder, before its writes
    def wait_then_hold() -> None:
        with local_store.writing_under(prefix):
            order.append("second")

    waiter = threading.Thread(target=wait_then_hold)
    waiter.start()
    time.sleep(0.3)
    assert order == ["first"]
    release.set()
    holder.join(10)
    waiter.join(10)
    assert order == ["first", "first released", "second"]
    assert local_store.get_bytes(f"{prefix}/a.jpg") == b"a"


def test_a_read_only_store_key_is_refused_before_any_download(
        seaweedfs_endpoint: str, seaweedfs_store: S3Store, synthetic_source: Path,
        tmp_path: Path) -> None:
    """SeaweedFS's read-only identity passes `head_bucket`: the write probe refuses it before
    the source is read, instead of at the first upload."""
    store = f"s3://{seaweedfs_store.bucket}/{seaweedfs_store.prefix}"
    result = invoke("ingest", "--source", str(synthetic_source), "--store", store, "--json",
                    cache=tmp_path / "cache",
                    env={"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader-secret",
                         "FLOWERML_S3_ENDPOINT_URL": seaweedfs_endpoint,
                         "FLOWERML_S3_ADDRESSING_STYLE": "path"})
    assert_refused(result, f"cannot write to the store {store}: access denied to bucket "
                           f"'{seaweedfs_store.bucket}'")
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "denied"
    assert store_keys(seaweedfs_store) == []
    assert not (tmp_path / "cache" / "flowers102").exists()  # nothing surveyed or staged


def test_ingesting_the_same_archive_again_keeps_the_images_added_on_top(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path) -> None:
    added = add_images(local_store, DATASET, str(class_folders(tmp_path / "new", {"1": 2})),
                       tmp_path / "cache")
    again = publish_split(local_store, DATASET, tmp_path / "cache")
    assert again.version == local_published.version  # the same archive: the same version
    assert (again.current, again.replaced) == (added.version, None)
    assert read_current(local_store, DATASET)["version"] == added.version
