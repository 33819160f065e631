"""`flowerml datasets list|show`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from flowerml.data.manifest import content_version, resolve_dataset
from flowerml.io.storage_local import LocalStore
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.synthetic import DATASET


def add_quarantined_version(store: LocalStore) -> str:
    """A second version beside CURRENT's, synthetic, with one quarantined image, whose
    manifest checks out (its entries hash to its version); returns the version."""
    published = resolve_dataset(store, DATASET)
    quarantined = ["image_00007.jpg"]
    version = content_version(published.files, quarantined, True)
    manifest = json.loads(store.get_bytes(f"datasets/{DATASET}/{published.version}/"
                                          "manifest.json"))
    store.put_bytes(f"datasets/{DATASET}/{version}/quarantine.json", json.dumps(
        [{"image": "image_00007.jpg", "split": "test", "label": 2,
          "reason": "truncated JPEG"}]).encode())
    store.put_bytes(f"datasets/{DATASET}/{version}/manifest.json", json.dumps(
        {**manifest, "version": version, "quarantined": 1, "quarantined_images": quarantined,
         "synthetic": True}).encode())
    return version


def test_list(local_published, local_store: LocalStore) -> None:
    add_quarantined_version(local_store)
    result = invoke("datasets", "list", "--store", str(local_store.root))
    assert result.exit_code == 0, result.output
    synthetic = "synthetic" if json.loads(local_store.get_bytes(
        f"datasets/{DATASET}/{local_published.version}/manifest.json")).get("synthetic") \
        else "not synthetic"
    assert result.stdout == (
        f"{DATASET}: 2 version(s), {local_published.version} [CURRENT]: train 8, valid 8, "
        f"test 8; 4 classes; 0 quarantined; {synthetic}; {local_store.uri}/datasets/{DATASET}/\n")


def test_list_json(local_published, local_store: LocalStore) -> None:
    result = invoke("datasets", "list", "--store", str(local_store.root), "--json")
    assert result.exit_code == 0, result.output
    [dataset] = json.loads(result.stdout)
    assert dataset["name"] == DATASET and dataset["current"] == local_published.version
    assert dataset["versions"][0]["counts"] == {"train": 8, "valid": 8, "test": 8}
    assert "quarantine" not in dataset["versions"][0]


def test_an_empty_store_lists_nothing(tmp_path: Path) -> None:
    result = invoke("datasets", "list", "--store", str(tmp_path / "empty"))
    assert result.exit_code == 0 and result.stdout == "" and "no datasets on" in result.stderr
    result = invoke("datasets", "list", "--store", str(tmp_path / "empty"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_show(local_published, local_store: LocalStore) -> None:
    other = add_quarantined_version(local_store)
    result = invoke("datasets", "show", "--store", str(local_store.root))  # FLOWERML_DATASET's
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    base = f"{local_store.uri}/datasets/{DATASET}/"
    assert lines[0] == f"dataset {DATASET}: CURRENT {local_published.version}; {base}"
    assert lines[1].startswith(f"  {local_published.version} [CURRENT]: train 8")
    assert lines[2] == f"    {base}{local_published.version}/"
    assert lines[3] == (f"  {other}: train 8, valid 8, test 8; 4 classes; 1 quarantined; "
                        "synthetic")
    assert lines[4] == f"    {base}{other}/"
    assert lines[5] == "    quarantined image_00007.jpg (test, label 2): truncated JPEG"


def test_show_json(local_published, local_store: LocalStore) -> None:
    other = add_quarantined_version(local_store)
    result = invoke("datasets", "show", DATASET, "--store", str(local_store.root), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    versions = {v["version"]: v for v in shown["versions"]}
    assert versions[local_published.version]["current"] is True
    assert versions[local_published.version]["quarantine"] == []
    assert versions[other]["synthetic"] is True and versions[other]["problem"] is None
    assert versions[other]["quarantine"][0]["reason"] == "truncated JPEG"


def test_an_unknown_dataset(local_published, local_store: LocalStore) -> None:
    message = f"dataset 'roses' is not on {local_store.uri}"
    assert_refused(invoke("datasets", "show", "roses", "--store", str(local_store.root)),
                   message)
    result = invoke("datasets", "show", "roses", "--store", str(local_store.root), "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "not-found"


def test_a_malformed_dataset_name(local_published, local_store: LocalStore) -> None:
    assert_refused(invoke("datasets", "show", "../x", "--store", str(local_store.root)),
                   "invalid dataset name '../x'")


def test_show_verifies_each_manifest_as_train_does(local_published,
                                                   local_store: LocalStore) -> None:
    """An edited manifest (an image dropped from it) is what `flowerml train` refuses:
    `datasets show` shows that problem on the version and exits 2 with it as its one line."""
    key = f"datasets/{DATASET}/{local_published.version}/manifest.json"
    manifest = json.loads(local_store.get_bytes(key))
    local_store.put_bytes(key, json.dumps({**manifest, "files": manifest["files"][1:]}).encode())
    problem = (f"{local_store.uri}/{key}: sha256 ")
    result = invoke("datasets", "show", "--store", str(local_store.root))
    assert_refused(result, f"flowerml: error: version {local_published.version}: {problem}")
    assert f"{local_published.version} [CURRENT]: {problem}" in result.stdout
    result = invoke("datasets", "show", "--store", str(local_store.root), "--json")
    shown, error = [json.loads(line) for line in result.stdout.splitlines()]
    assert shown["versions"][0]["problem"].startswith(problem)
    assert error["kind"] == "bad-input" and problem in error["error"]
    train = invoke("train", "--store", str(local_store.root), "--recipe", "demo", "--device",
                   "cpu")
    assert_refused(train, problem)  # the same refusal, in train's words


def test_show_prints_the_chain_of_additions(local_published, local_store: LocalStore,
                                            tmp_path: Path) -> None:
    from flowerml.data.add import add_images
    from tests.helpers.additions import class_folders, copy_published_image

    first = class_folders(tmp_path / "first", {"2": 2, "3": 1})
    one = add_images(local_store, DATASET, str(first), tmp_path / "cache")
    second = class_folders(tmp_path / "second", {"4": 1}, seed=7)
    copy_published_image(local_store, local_published, "test", second / "4" / "leak.jpg")
    two = add_images(local_store, DATASET, str(second), tmp_path / "cache", split="valid")
    result = invoke("datasets", "show", "--store", str(local_store.root))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:5] == [
        f"  chain (CURRENT first): {two.version} <- {one.version} <- {local_published.version}",
        f"    {two.version}: on top of {one.version}: added valid 1 (004: 1); skipped 1 leakage",
        f"    {one.version}: on top of {local_published.version}: added train 3 (002: 2, 003: 1)",
        f"    {local_published.version}: ingested"]
    shown = json.loads(invoke("datasets", "show", "--store", str(local_store.root),
                              "--json").stdout)
    assert shown["chain"] == [two.version, one.version, local_published.version]
    by_version = {v["version"]: v for v in shown["versions"]}
    assert by_version[two.version]["parent"] == one.version
    assert by_version[two.version]["skipped"] == {"already_present": 0, "leakage": 1,
                                                  "rejected": 0}
