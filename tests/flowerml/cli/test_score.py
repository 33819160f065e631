"""`flowerml score` as a user runs it: parts and _SUCCESS.json on the output, unreadable images
in their own rows (exit 1), a re-run that finds the work done, refusals before any write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result

from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.scoring import PHOTO_KEYS, write_photos
from tests.helpers.stores import replace_file


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
    assert lines[2].startswith("no drift: PSI top-1 probability ") or lines[2].startswith(
        "drift found: PSI top-1 probability "), lines[2]
    assert lines[3].startswith("failed: cut.jpg: unreadable image")
    assert len(lines) == 4
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
                                  "output not writable", "output scheme", "no export",
                                  "drift threshold -1", "review below 2"])
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
        "drift threshold -1": ([str(photos), "--drift-threshold", "-1"],
                               "--drift-threshold must be a population stability index of at "
                               "least 0 (got -1.0)"),
        "review below 2": ([str(photos), "--review-below", "2"],
                           "--review-below must be a probability above 0 and at most 1 "
                           "(got 2.0)"),
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


def test_drift_found_is_one_line_and_leaves_the_exit_code(registry: Registry, photos: Path,
                                                          tmp_path: Path) -> None:
    # photos are not the version's test images: at threshold 0 any difference is drift
    result = run_score(registry, f"{photos}/sub", "--output", str(tmp_path / "s"),
                       "--drift-threshold", "0")
    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[2]  # after the summary and the results' folder
    assert len(result.stdout.splitlines()) == 3
    assert line.startswith("drift found: PSI top-1 probability ")
    assert line.endswith(", above 0, against flowers102:000001's test baseline")


def test_review_jsonl_labelled_goes_back_in_through_ingest_add(registry: Registry,
                                                                tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos")
    (photos / "cut.jpg").unlink()
    result = run_score(registry, str(photos), "--output", str(tmp_path / "scores"),
                       "--review-below", "1", "--json")
    assert result.exit_code == 0, result.output
    review = json.loads(result.stdout)["review"]
    assert review["images"] == 7 and review["below"] == 1.0
    rows = [json.loads(line) for line in Path(review["file"]).read_text().splitlines()]
    assert [row["probability"] for row in rows] == sorted(row["probability"] for row in rows)

    # a row left without a label is refused, naming its line; nothing is published
    (photos / "unlabelled.jsonl").write_text(Path(review["file"]).read_text())
    datasets = registry.store.root / "datasets"
    before = sorted(p.relative_to(datasets) for p in datasets.rglob("*"))
    refused = invoke("ingest", "--add", str(photos / "unlabelled.jsonl"), store=registry.store,
                     cache=tmp_path / "cache")
    assert_refused(refused, f"{photos / 'unlabelled.jsonl'} line 1: needs the keys path, label")
    assert sorted(p.relative_to(datasets) for p in datasets.rglob("*")) == before

    # labelled (each with the model's own guess) and saved beside the photos, it goes in
    labelled = photos / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**row, "label": row["names"][0]}) + "\n"
                                for row in rows))
    added = invoke("ingest", "--add", str(labelled), "--json", store=registry.store,
                   cache=tmp_path / "cache")
    assert added.exit_code == 0, added.output
    summary = json.loads(added.stdout.splitlines()[-1])
    assert summary["added_images"] == 6, added.stdout  # a dataset holds JPEGs: c.png is not
    assert summary["rejected"] == [{"path": str(photos / "c.png"), "reason": "not a JPEG (PNG)"}]
