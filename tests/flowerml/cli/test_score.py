"""`flowerml score` as a user runs it: parts and _SUCCESS.json on the output, unreadable images
in their own rows (exit 1), a re-run that finds the work done, refusals before any write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result

from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.registries import ExportedRegistry, export_registry_copy, own_registry
from tests.helpers.scoring import PHOTO_KEYS, write_photos
from tests.helpers.stores import replace_file
from tests.helpers.synthetic import RegisteredRun


@pytest.fixture(scope="module")
def exported_registry(registered_run: RegisteredRun,
                      tmp_path_factory: pytest.TempPathFactory) -> ExportedRegistry:
    return export_registry_copy(registered_run, tmp_path_factory.mktemp("cli-registry"))


@pytest.fixture
def registry(exported_registry: ExportedRegistry, tmp_path: Path) -> Registry:
    return own_registry(exported_registry, tmp_path / "registry-store")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def run_score(registry: Registry, *args: str) -> Result:
    return invoke("score", *args, store=registry.store, cache=registry.store.root.parent / "c")


def nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


def test_score_writes_its_parts_says_what_failed_and_exits_1(registry: Registry, photos: Path,
                                                            tmp_path: Path) -> None:
    output = tmp_path / "scores"
    result = run_score(registry, str(photos), "--output", str(output), "--shard-size", "4",
                       "--batch-size", "2", "--top-k", "3")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    # notes.txt is not named like an image: left out of the folder, as predict leaves it out
    assert lines[0].startswith("scored 8 images with flowers102:000001 (onnx): 7 ok, 1 failed")
    [success] = output.rglob("_SUCCESS.json")
    assert lines[1] == f"results: {success.parent}/ (2 part files, _SUCCESS.json)"
    assert lines[2].startswith("failed: cut.jpg: unreadable image")
    assert len(lines) == 3
    assert result.stderr.splitlines()[0].startswith("shard 1/2: 4 images, 1 failed (")
    rows = [json.loads(line) for part in sorted(success.parent.glob("part-*.jsonl"))
            for line in part.read_text().splitlines()]
    assert [row["key"] for row in rows] == PHOTO_KEYS
    assert all(len(row["labels"]) == 3 for row in rows if "error" not in row)

    again = run_score(registry, str(photos), "--output", str(output), "--shard-size", "4",
                      "--top-k", "3", "--json")
    assert again.exit_code == 1, again.output
    summary = json.loads(again.stdout)  # stdout holds the JSON summary only
    assert summary["already_complete"] and summary == {
        **json.loads(success.read_text()), "already_complete": True}


def test_a_collection_without_failures_exits_0(registry: Registry, photos: Path,
                                               tmp_path: Path) -> None:
    result = run_score(registry, f"{photos}/sub/*.jp*g", "--output", f"file://{tmp_path}/s",
                       "--runtime", "torch", "--parallel", "2", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["failed"], summary["runtime"]) == (2, 0, "torch")
    assert summary["output"].startswith(f"{tmp_path}/s/flowers102/000001/")


@pytest.mark.parametrize("case", ["no images", "shard size 0", "no such alias",
                                  "output not writable", "output scheme", "no export"])
def test_bad_input_is_one_line_and_writes_nothing(registry: Registry, photos: Path,
                                                  tmp_path: Path, case: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no photos here")
    (tmp_path / "file").write_text("in the way")
    output = str(tmp_path / "scores")
    args, message = {
        "no images": ([str(empty)], f"INPUT {empty}: no images there (1 other files"),
        "shard size 0": ([str(photos), "--shard-size", "0"],
                         "--shard-size must be a whole number of at least 1 (got 0)"),
        "no such alias": ([str(photos), "--model", "flowers102@staging"],
                          "flowers102 has no alias 'staging'"),
        "output not writable": ([str(photos), "--output", str(tmp_path / "file" / "x")],
                                f"--output {tmp_path}/file/x is not writable"),
        "output scheme": ([str(photos), "--output", "ftp://host/x"],
                          "--output 'ftp://host/x' uses an unsupported scheme"),
        "no export": ([str(photos), "--model", "flowers102:1", "--runtime", "onnx"],
                      "flowers102:000001 has no ONNX export (run: flowerml export"),
    }[case]
    if case == "no export":
        for name in ("export.json", "model.onnx"):
            (registry.store.root / registry.attachment_key(1, name)).unlink()
    result = run_score(registry, *args, "--output", output) if "--output" not in args else \
        run_score(registry, *args)
    assert_refused(result, message)
    assert result.stdout == ""
    assert nothing_under(tmp_path / "scores") and nothing_under(tmp_path / "file" / "x")

    as_json = run_score(registry, *args, "--json") if "--output" in args else \
        run_score(registry, *args, "--output", output, "--json")
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["error"].startswith(message[:20])


def test_a_tampered_onnx_file_is_refused(registry: Registry, photos: Path,
                                         tmp_path: Path) -> None:
    path = registry.store.root / registry.attachment_key(1, "model.onnx")
    replace_file(path, b"\0" + path.read_bytes()[1:])
    result = run_score(registry, str(photos), "--output", str(tmp_path / "scores"))
    assert_refused(result, "model.onnx fails its checksum (sha256 ")
    assert nothing_under(tmp_path / "scores")


def test_score_is_in_the_help() -> None:
    result = invoke("score", "--help")
    assert result.exit_code == 0
    for option in ("--model", "--output", "--runtime", "--batch-size", "--shard-size",
                   "--json"):
        assert option in result.stdout


@pytest.mark.timeout(120)  # a FIFO that is read blocks: fail, do not hang the suite
def test_a_list_that_cannot_be_read_is_one_line_and_writes_nothing(registry: Registry,
                                                                   photos: Path,
                                                                   tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "latin1.txt").write_bytes(b"# today\nf\xe9e.jpg\n")
    output = tmp_path / "scores"
    for name, why in (("pipe.txt", "is a FIFO (named pipe), not a regular file"),
                      ("latin1.txt", "line 2 is not UTF-8 text; save the list as UTF-8")):
        result = run_score(registry, str(tmp_path / name), "--output", str(output))
        assert_refused(result, f"INPUT {tmp_path / name}: {why}")
        assert result.stderr == f"flowerml: error: INPUT {tmp_path / name}: {why}\n"
        assert nothing_under(output)  # no _listing.json, no _shards
