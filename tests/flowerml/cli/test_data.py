"""`flowerml synth` and `flowerml ingest` (flowerml/cli/data.py): JSON output, and one clear line
with exit code 2 for bad input."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flowerml.data import flowers
from flowerml.data.manifest import PublishedDataset
from flowerml.io.storage_local import LocalStore
from tests.helpers.additions import class_folders, csv_list
from tests.helpers.archives import archive_members, regular, rewrite_archive, rewrite_mat, special
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.network import free_port
from tests.helpers.stores import store_keys
from tests.helpers.synthetic import DATASET


def ingest_args(source: Path | str, store: Path | str, *extra: str) -> list[str]:
    return ["ingest", "--source", str(source), "--store", str(store), "--json", *extra]


def published(store_dir: Path) -> list[Path]:
    """Everything in a local store: empty means nothing was published (nor mirrored)."""
    return [p for p in store_dir.rglob("*") if p.is_file()] if store_dir.exists() else []


def test_synth_then_ingest_json(tmp_path: Path) -> None:
    made = invoke("synth", str(tmp_path / "src"), "--classes", "3", "--per-class", "4",
                  "--image-size", "40", "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["images"] == 12
    result = invoke(*ingest_args(tmp_path / "src", tmp_path / "store"),
                    env={"FLOWERML_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {"dataset", "version", "counts", "uploaded", "skipped", "quarantined",
                            "store", "location", "replaced", "synthetic", "current"}
    assert summary["counts"] == {"train": 3, "valid": 3, "test": 6}
    assert summary["uploaded"] == 12 and summary["quarantined"] == 0
    assert summary["current"] == summary["version"]


def test_synth_bad_option(tmp_path: Path) -> None:
    assert_refused(invoke("synth", str(tmp_path), "--classes", "0"),
                   "--classes must be between 1 and 102 (got 0)")


def test_invalid_setting_names_the_variable(tmp_path: Path, source_copy: Path) -> None:
    result = invoke(*ingest_args(source_copy, tmp_path / "store"),
                    env={"FLOWERML_TRANSFER_CONCURRENCY": "zero"})
    assert_refused(result, "FLOWERML_TRANSFER_CONCURRENCY")
    assert published(tmp_path / "store") == []


def unofficial_bytes(folder: Path) -> str:
    """The synthetic archive itself: run with --verify, its MD5 is not the official one."""
    return "102flowers.tgz: MD5 mismatch: expected 52808999861908f626f3c1f4e79d11fa"


def damage_truncated(folder: Path) -> str:
    data = (folder / flowers.ARCHIVE).read_bytes()
    (folder / flowers.ARCHIVE).write_bytes(data[: len(data) * 2 // 3])
    return "102flowers.tgz: truncated or corrupt archive"


def damage_html(folder: Path) -> str:
    (folder / flowers.ARCHIVE).write_text("<!DOCTYPE html><html><title>503</title></html>")
    return "102flowers.tgz: is an HTML page, not a gzip archive"


def damage_member(member: tuple[tarfile.TarInfo, bytes | None]) -> Callable[[Path], str]:
    def damage(folder: Path) -> str:
        rewrite_archive(folder, extra=[member])
        return f"archive member {member[0].name!r}"
    return damage


def damage_labels_key(folder: Path) -> str:
    rewrite_mat(folder / flowers.LABELS, labels=None, other=np.array([[1]]))
    return "imagelabels.mat: missing key 'labels' (found: flowerml_synthetic, other)"


def damage_setid_key(folder: Path) -> str:
    rewrite_mat(folder / flowers.SETID, tstid=None)
    return "setid.mat: missing key 'tstid'"


def damage_label_range(folder: Path) -> str:
    labels = np.full((1, 24), 1, dtype=np.int32)
    labels[0, 3] = 200
    rewrite_mat(folder / flowers.LABELS, labels=labels)
    return "imagelabels.mat: key 'labels' has values out of range 1..102 (e.g. 200)"


def damage_id_in_two_splits(folder: Path) -> str:
    import scipy.io

    setid = scipy.io.loadmat(folder / flowers.SETID)
    first_train = int(setid["trnid"][0, 0])
    rewrite_mat(folder / flowers.SETID,
                valid=np.append(setid["valid"], [[first_train]], axis=1))
    return f"setid.mat: image id {first_train} appears more than once (in trnid, valid)"


DAMAGES = {
    "wrong-md5": unofficial_bytes,
    "truncated-tgz": damage_truncated,
    "html-instead-of-tgz": damage_html,
    "dotdot-member": damage_member(regular("../evil.jpg")),
    "absolute-member": damage_member(regular("/tmp/evil.jpg")),
    "symlink-member": damage_member(special("jpg/image_09998.jpg", tarfile.SYMTYPE, "/etc")),
    "hardlink-member": damage_member(special("jpg/image_09999.jpg", tarfile.LNKTYPE,
                                             "jpg/image_00001.jpg")),
    "labels-missing-key": damage_labels_key,
    "setid-missing-key": damage_setid_key,
    "label-out-of-range": damage_label_range,
    "id-in-two-splits": damage_id_in_two_splits,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_source_is_refused_and_nothing_published(damage: str, source_copy: Path,
                                                     tmp_path: Path) -> None:
    message = DAMAGES[damage](source_copy)
    result = invoke(*ingest_args(source_copy, tmp_path / "store", "--verify"
                                 if damage == "wrong-md5" else "--no-verify"),
                    env={"FLOWERML_CACHE_DIR": str(tmp_path / "cache")})
    assert_refused(result, message)
    assert published(tmp_path / "store") == []
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()


def test_corrupt_jpeg_is_quarantined_and_ingest_succeeds(source_copy: Path,
                                                         tmp_path: Path) -> None:
    good = archive_members(source_copy)["jpg/image_00002.jpg"]
    rewrite_archive(source_copy, replace={2: good[:100]})
    result = invoke(*ingest_args(source_copy, tmp_path / "store"),
                    env={"FLOWERML_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quarantined"] == 1 and sum(summary["counts"].values()) == 23
    quarantine = tmp_path / "store/datasets/flowers102" / summary["version"] / "quarantine.json"
    assert json.loads(quarantine.read_text())[0]["image"] == "image_00002.jpg"


def test_html_page_served_over_http(source_copy: Path, tmp_path: Path) -> None:
    damage_html(source_copy)
    handler = functools.partial(_Quiet, directory=str(source_copy))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = invoke(*ingest_args(f"http://127.0.0.1:{server.server_address[1]}/",
                                     tmp_path / "store"),
                        env={"FLOWERML_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        server.shutdown()
    assert_refused(result, "102flowers.tgz: is an HTML page")
    assert published(tmp_path / "store") == []


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_missing_bucket(source_copy: Path, tmp_path: Path, moto_endpoint: str) -> None:
    result = invoke(*ingest_args(source_copy, "s3://no-such-bucket/x"),
                    env={"FLOWERML_S3_ENDPOINT_URL": moto_endpoint})
    assert_refused(result, f"bucket 'no-such-bucket' at {moto_endpoint} does not exist")


@pytest.mark.slow  # starts an auth-enforcing moto server process
def test_access_denied(source_copy: Path, denying_s3_endpoint: str) -> None:
    result = invoke(*ingest_args(source_copy, "s3://guarded/x"),
                    env={"FLOWERML_S3_ENDPOINT_URL": denying_s3_endpoint})
    assert_refused(result, f"access denied to bucket 'guarded' at {denying_s3_endpoint}")
    assert "testing-secret" not in result.output


def test_unreachable_endpoint(source_copy: Path, s3_bucket: str, moto_endpoint: str,
                              tmp_path: Path) -> None:
    port = free_port()
    result = invoke(*ingest_args(source_copy, f"s3://{s3_bucket}/x"),
                    env={"FLOWERML_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    assert_refused(result, f"cannot reach S3 endpoint http://127.0.0.1:{port}")
    import boto3

    listed = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=s3_bucket)
    assert listed.get("KeyCount", 0) == 0


# --------------------------------------------------------------------------------------------
# ingest --add


def add_args(source: Path | str, *extra: str) -> list[str]:
    return ["ingest", "--add", str(source), *extra]


def assert_add_refused(result, line: str, store: LocalStore, before: list[str]) -> None:
    """Exactly `flowerml: error: <line>`, exit 2, and the store as it was (CURRENT too)."""
    assert_refused(result, line)
    assert result.stderr == f"flowerml: error: {line}\n"
    assert store_keys(store) == before


@pytest.fixture
def add_store(local_store: LocalStore, local_published: PublishedDataset) -> LocalStore:
    return local_store


def test_add_json_then_again(add_store: LocalStore, local_published: PublishedDataset,
                             tmp_path: Path) -> None:
    source = class_folders(tmp_path / "new", {"01": 1, "Pink Primrose": 1})
    first = invoke(*add_args(source, "--json"), store=add_store, cache=tmp_path / "cache")
    assert first.exit_code == 0, first.output
    added = json.loads(first.stdout)
    assert (added["parent"], added["published"], added["added_images"], added["uploaded"]) == (
        local_published.version, True, 2, 2)
    again = invoke(*add_args(source), store=add_store, cache=tmp_path / "cache")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[:2] == [
        f"nothing new: {DATASET}@{added['version']} (CURRENT) already holds every image; "
        "nothing published", "already present: 2"]


BAD_FOLDERS = {
    "unknown class": ({"tulips": 1}, "{root}/tulips/: 'tulips' is not a class of the dataset "
                      "(a label 1..4 or one of its class names)"),
    "label out of range": ({"005": 1}, "{root}/005/: label 005 is out of range 1..4"),
    "label zero": ({"0": 1}, "{root}/0/: label 0 is out of range 1..4"),
    "empty source": ({}, "{root}: no images to add"),
}


@pytest.mark.parametrize("folders,line", BAD_FOLDERS.values(), ids=BAD_FOLDERS)
def test_add_refuses_a_bad_folder(folders: dict, line: str, add_store: LocalStore,
                                  tmp_path: Path) -> None:
    root = class_folders(tmp_path / "new", {"1": 1, **folders})
    if not folders:
        shutil.rmtree(root / "1")
    before = store_keys(add_store)
    result = invoke(*add_args(root), store=add_store, cache=tmp_path / "cache")
    assert_add_refused(result, line.format(root=root.resolve()), add_store, before)


def test_add_refuses_a_link_out_of_the_source(add_store: LocalStore, tmp_path: Path) -> None:
    root = class_folders(tmp_path / "new", {"1": 1})
    outside = class_folders(tmp_path / "elsewhere", {"x": 1}) / "x" / "new_0.jpg"
    (root / "1" / "linked.jpg").symlink_to(outside)
    before = store_keys(add_store)
    result = invoke(*add_args(root), store=add_store, cache=tmp_path / "cache")
    assert_add_refused(result, f"{root.resolve()}/1/linked.jpg: outside the source root "
                       f"{root.resolve()}", add_store, before)


BAD_LISTS = {
    "unknown class": ("labels.csv", "path,label\nx/new_0.jpg,tulip\n",
                      "{list} row 2: 'tulip' is not a class of the dataset (a label 1..4 or "
                      "one of its class names)"),
    "label out of range": ("labels.csv", "path,label\nx/new_0.jpg,103\n",
                           "{list} row 2: label 103 is out of range 1..4"),
    "path outside the root": ("labels.csv", "path,label\n../x/new_0.jpg,1\n",
                              "{list} row 2: ../x/new_0.jpg is outside the source root {root}"),
    "missing columns": ("labels.csv", "file,class\nx/new_0.jpg,1\n",
                        "{list}: needs the columns path, label in its header (found: file, "
                        "class)"),
    "empty list": ("labels.csv", "path,label\n", "{list}: no images to add"),
    "row without a label": ("labels.csv", "path,label\nx/new_0.jpg,1\nx/new_0.jpg,\n",
                            "{list} row 3: needs a path and a label"),
    "jsonl without a key": ("labels.jsonl", '{"path": "x/new_0.jpg"}\n',
                            "{list} line 1: needs the keys path, label (path a string, label a "
                            "number or a class name)"),
    "jsonl not json": ("labels.jsonl", "path,label\n", "{list} line 1: not a JSON object"),
}


@pytest.mark.parametrize("name,text,line", BAD_LISTS.values(), ids=BAD_LISTS)
def test_add_refuses_a_bad_list(name: str, text: str, line: str, add_store: LocalStore,
                                tmp_path: Path) -> None:
    root = class_folders(tmp_path / "lists", {"x": 1})
    listed = root / name
    listed.write_text(text)
    before = store_keys(add_store)
    result = invoke(*add_args(listed), store=add_store, cache=tmp_path / "cache")
    assert_add_refused(result, line.format(list=listed, root=root.resolve()), add_store, before)


def test_add_refuses_one_image_under_two_labels(add_store: LocalStore, tmp_path: Path) -> None:
    root = class_folders(tmp_path / "lists", {"x": 1})
    listed = csv_list(root / "labels.csv", [("x/new_0.jpg", "1"), ("x/new_0.jpg", "2")])
    before = store_keys(add_store)
    result = invoke(*add_args(listed), store=add_store, cache=tmp_path / "cache")
    image = f"{root.resolve()}/x/new_0.jpg"
    assert_add_refused(result, f"{image}: the same image as {image}, with label 2 instead of 1",
                       add_store, before)


@pytest.mark.parametrize("extra,line", [
    (("--split", "test"), "--split must be one of train, valid: got 'test'"),
    (("--source", "official"), "--add and --source: give one (--source ingests an archive, "
                               "--add adds images to a published dataset)"),
])
def test_add_refuses_bad_options(extra: tuple[str, ...], line: str, add_store: LocalStore,
                                 tmp_path: Path) -> None:
    root = class_folders(tmp_path / "new", {"1": 1})
    before = store_keys(add_store)
    result = invoke(*add_args(root, *extra), store=add_store, cache=tmp_path / "cache")
    assert_add_refused(result, line, add_store, before)


def test_add_to_a_dataset_never_ingested(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    root = class_folders(tmp_path / "new", {"1": 1})
    result = invoke(*add_args(root, "--json"), store=store, cache=tmp_path / "cache")
    assert result.exit_code == 2
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "error": f"dataset '{DATASET}' has no CURRENT version on {store.uri}: ingest it before "
                 "adding to it (flowerml ingest)", "kind": "not-found"}
    assert published(tmp_path / "store") == []


# --------------------------------------------------------------------------------------------
# A dataset of your own classes: --source imagefolder:PATH


def own_classes(root: Path) -> Path:
    """`root/{train,valid,test}/{tulip,daisy,rose}/`, 3 distinct JPEGs each."""
    for seed, split in enumerate(("train", "valid", "test"), start=1):
        class_folders(root / split, dict.fromkeys(("tulip", "daisy", "rose"), 3), seed=seed)
    return root


def test_imagefolder_ingest_prints_its_class_names(tmp_path: Path) -> None:
    source = own_classes(tmp_path / "mine")
    env = {"FLOWERML_CACHE_DIR": str(tmp_path / "cache")}
    result = invoke("ingest", "--source", f"imagefolder:{source}", "--dataset", "garden",
                    "--store", str(tmp_path / "store"), env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("published garden@") and lines[0].endswith(
        "train 9, valid 9, test 9; uploaded 27, already there 0, quarantined 0")
    assert lines[1] == "classes (3): daisy, rose, tulip"
    flat = class_folders(tmp_path / "flat", {"b": 10, "a": 10})
    result = invoke("ingest", "--source", f"imagefolder:{flat}", "--split-ratios", "0.8,0.1,0.1",
                    "--seed", "3", "--dataset", "flat", "--store", str(tmp_path / "store"),
                    "--json", env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["classes"] == ["a", "b"]
    assert summary["counts"] == {"train": 16, "valid": 2, "test": 2}


@pytest.mark.parametrize(("args", "message"), [
    (["--split-ratios", "0.8,0.1,0.1"], "flowerml: error: --split-ratios: only with --source "
                                        "imagefolder:PATH (a folder of class folders to split)"),
    (["--seed", "1"], "flowerml: error: --seed: only with --source imagefolder:PATH"),
    (["--source", "imagefolder:", "--split-ratios", "1,0,0"],
     "flowerml: error: --source 'imagefolder:' has no folder after imagefolder:"),
])
def test_split_options_need_an_imagefolder(tmp_path: Path, source_copy: Path, args: list[str],
                                           message: str) -> None:
    args = args if "--source" in args else ["--source", str(source_copy), *args]
    result = invoke("ingest", *args, "--store", str(tmp_path / "store"))
    assert_refused(result, message)
    assert published(tmp_path / "store") == []


def test_imagefolder_bad_input_is_refused_with_nothing_published(tmp_path: Path) -> None:
    flat = class_folders(tmp_path / "flat", {"a": 2, "b": 2})
    env = {"FLOWERML_CACHE_DIR": str(tmp_path / "cache")}
    result = invoke("ingest", "--source", f"imagefolder:{flat}", "--split-ratios", "0.5,0.5,0",
                    "--store", str(tmp_path / "store"), "--json", env=env)
    assert result.exit_code == 2
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "error": f"{flat}/a: 2 usable image(s) leave test empty at --split-ratios 0.5,0.5,0 "
                 "(every split needs at least one image of each class)", "kind": "bad-input"}
    assert_refused(invoke("ingest", "--source", f"imagefolder:{tmp_path}/nope", "--store",
                          str(tmp_path / "store"), env=env),
                   f"flowerml: error: imagefolder:{tmp_path}/nope: folder {tmp_path}/nope does "
                   "not exist")
    assert published(tmp_path / "store") == []


@pytest.mark.slow  # ~12 s on two busy cores: a training, an evaluation and a prediction
def test_an_imagefolder_dataset_trains_evaluates_registers_and_predicts_its_names(
        tmp_path: Path) -> None:
    source = own_classes(tmp_path / "mine")
    env = {"FLOWERML_CACHE_DIR": str(tmp_path / "cache"), "FLOWERML_STORE": str(tmp_path / "s"),
           "FLOWERML_DATASET": "garden"}

    def run(*args: str) -> str:
        result = invoke(*args, env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    run("ingest", "--source", f"imagefolder:{source}")
    run("train", "--recipe", "demo", "--epochs", "1", "--image-size", "40", "--batch-size", "8",
        "--device", "cpu", "--workers", "0", "--run-id", "own")
    evaluated = json.loads(run("evaluate", "--run", "own", "--device", "cpu", "--workers", "0",
                               "--json"))
    assert evaluated["n"] == 9
    per_class = json.loads((Path(evaluated["report"]).parent / "per_class.json").read_text())
    assert [(c["label"], c["name"], c["support"]) for c in per_class] == [
        (1, "daisy", 3), (2, "rose", 3), (3, "tulip", 3)]
    run("registry", "register", "--run", "own", "--model", "garden", "--threshold", "0",
        "--device", "cpu")
    predicted = run("predict", str(source / "test" / "rose" / "new_0.jpg"), "--model",
                    "garden:1", "--top-k", "3", "--device", "cpu")
    names = [part.split()[0] for part in predicted.split(": ", 1)[1].split(", ")]
    assert sorted(names) == ["daisy", "rose", "tulip"]
