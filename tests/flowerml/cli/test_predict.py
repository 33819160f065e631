"""`flowerml predict` as a user runs it: files, folders and patterns, one result per input,
failed inputs in their own rows (exit 1), refusals before anything runs (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result

from tests.helpers.cli import assert_refused, invoke
from tests.helpers.images import write_jpeg, write_png_header, write_truncated_jpeg
from tests.helpers.stores import StoreAndCache


@pytest.fixture
def photos(tiny_run: StoreAndCache, tmp_path: Path) -> Path:
    """A folder of 3 test images (one in a subfolder), a note and a hidden file beside them."""
    store, _ = tiny_run
    images = sorted((store.root / "datasets").rglob("test/*/*.jpg"))[:3]
    folder = tmp_path / "photos"
    for name, image in zip(("b.jpg", "a.jpg", "sub/c.jpg"), images, strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image.read_bytes())
    (folder / "notes.md").write_text("not a photo")
    (folder / ".a.jpg").write_bytes(b"macOS metadata, not an image")
    return folder


def predict(tiny_run: StoreAndCache, *args: str) -> Result:
    store, cache = tiny_run
    # The test's own options come last: click keeps the last of a repeated option.
    return invoke("predict", "--run", "tiny", "--device", "cpu", *args, store=store, cache=cache)


FLOWERML = Path(sys.executable).with_name("flowerml")
"""The console script, for what depends on the real process: its stdout closed under it."""


def predict_process(tiny_run: StoreAndCache, *args: str, **popen: object) -> subprocess.Popen:
    store, cache = tiny_run
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache)}
    return subprocess.Popen([str(FLOWERML), "predict", "--run", "tiny", "--device", "cpu", *args],
                            env=env, **popen)  # type: ignore[call-overload]


def json_rows(result: Result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_folder_and_a_pattern_give_one_json_line_per_image(tiny_run: StoreAndCache,
                                                             photos: Path) -> None:
    result = predict(tiny_run, str(photos), f"{photos}/*.jpg", "--top-k", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = json_rows(result)
    assert [row["image"] for row in rows] == [
        f"{photos}/a.jpg", f"{photos}/b.jpg", f"{photos}/sub/c.jpg",  # the folder, recursively
        f"{photos}/a.jpg", f"{photos}/b.jpg"]  # the pattern, as a shell would expand it
    assert all(len(row["predictions"]) == 2 for row in rows)
    assert rows[0]["predictions"] == rows[3]["predictions"]
    assert result.stderr == ""


def test_failed_inputs_get_their_own_rows_and_exit_1(tiny_run: StoreAndCache, photos: Path,
                                                     tmp_path: Path) -> None:
    bomb = write_png_header(tmp_path / "bomb.png", 30_000, 30_000)  # 900 megapixels
    cut = write_truncated_jpeg(tmp_path / "cut.jpg")
    large = write_jpeg(tmp_path / "large.jpg", 2400, 1600)
    inputs = [str(photos / "a.jpg"), str(tmp_path / "missing.jpg"), str(photos / "notes.md"),
              str(bomb), str(cut), f"{tmp_path}/*.gif", str(large), str(photos / "b.jpg")]
    errors = {1: "no such file or folder", 2: "not an image file",
              3: "too large to decode safely: Image size (900000000 pixels) exceeds limit",
              4: "unreadable image: image file is truncated", 5: "no file matches this pattern"}

    as_json = predict(tiny_run, *inputs, "--batch-size", "3", "--json")
    assert as_json.exit_code == 1, as_json.output
    rows = json_rows(as_json)  # stdout holds JSON only
    assert [row["image"] for row in rows] == inputs
    for index, row in enumerate(rows):
        if index in errors:
            assert set(row) == {"image", "error"} and row["error"].startswith(errors[index])
        else:
            assert set(row) == {"image", "predictions"} and len(row["predictions"]) == 4

    human = predict(tiny_run, *inputs, "--batch-size", "3")
    assert human.exit_code == 1, human.output
    lines = human.stdout.splitlines()
    assert len(lines) == len(inputs)
    for index, (line, name) in enumerate(zip(lines, inputs, strict=True)):
        if index in errors:
            assert line.startswith(f"{name}: error: {errors[index]}")
        else:
            assert line.startswith(f"{name}: ") and line.count(", ") == 3  # four names

    for result in (as_json, human):  # a note per failed input, then the count
        notes = result.stderr.splitlines()
        assert notes[:-1] == [f"flowerml: error: {rows[i]['image']}: {rows[i]['error']}"
                              for i in sorted(errors)]
        assert notes[-1] == "flowerml: 5 of 8 inputs could not be predicted"
        assert "Traceback" not in result.output


def test_a_list_file_names_images_as_flowerml_score_reads_them(tiny_run: StoreAndCache,
                                                                photos: Path) -> None:
    """A .txt list (flowerml.serving.inputs): entries beside it, every one tried, comments skipped."""
    (photos / "today.txt").write_text("# today\nsub/c.jpg\nnotes.md\na.jpg\n")
    result = predict(tiny_run, str(photos / "today.txt"), "--json")
    assert result.exit_code == 1, result.output
    rows = json_rows(result)
    assert [row["image"] for row in rows] == [f"{photos}/sub/c.jpg", f"{photos}/notes.md",
                                              f"{photos}/a.jpg"]
    assert rows[1]["error"].startswith("not an image file")
    assert "predictions" in rows[0] and "predictions" in rows[2]


def test_one_bad_input_is_one_stderr_line(tiny_run: StoreAndCache, tmp_path: Path) -> None:
    bomb = write_png_header(tmp_path / "bomb.png", 30_000, 30_000)
    result = predict(tiny_run, str(bomb))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"flowerml: error: {bomb}: too large to decode safely: Image size (900000000 pixels) "
        "exceeds limit of 178956970 pixels"]
    assert result.stdout.startswith(f"{bomb}: error: too large to decode safely")


@pytest.mark.parametrize(("args", "message"), [
    (["--top-k", "0"], "--top-k"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda"),
    (["--model", "flowers102@production"], "give --model or --run, not both"),
])
def test_bad_options_are_refused_before_anything_runs(tiny_run: StoreAndCache, photos: Path,
                                                      args: list[str], message: str) -> None:
    for json_flag in ([], ["--json"]):
        result = predict(tiny_run, str(photos), *args, *json_flag)
        assert_refused(result, message)
        if json_flag:
            *rows, last = result.stdout.splitlines()
            assert rows == [] and set(json.loads(last)) == {"error", "kind"}
        else:
            assert result.stdout == ""


def test_an_unknown_run_or_model_is_refused(tiny_run: StoreAndCache, photos: Path) -> None:
    store, cache = tiny_run
    assert_refused(invoke("predict", str(photos), "--run", "nope", store=store, cache=cache),
                   "run 'nope' not found")
    result = invoke("predict", str(photos), "--model", "tulips", "--json", store=store,
                    cache=cache)
    assert_refused(result, "tulips")
    assert set(json.loads(result.stdout)) == {"error", "kind"}


def test_every_option_has_help(tiny_run: StoreAndCache) -> None:
    result = invoke("predict", "--help")
    assert result.exit_code == 0
    for option in ("--model", "--run", "--store", "--top-k", "--batch-size", "--device",
                   "--json"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(option))
        assert len(line.split(None, 2)) == 3, line  # the option, its metavar and its help


@pytest.mark.timeout(120)  # seconds when it works; a FIFO's read would block: fail instead
def test_a_fifo_is_its_own_error_row_and_never_blocks(tiny_run: StoreAndCache, photos: Path,
                                                      tmp_path: Path) -> None:
    """A FIFO named as an image, or found in a folder, would block its read forever: it is
    that input's row, and the folder's images around it are predicted."""
    os.mkfifo(tmp_path / "named.jpg")
    os.mkfifo(photos / "pipe.jpg")
    result = predict(tiny_run, str(tmp_path / "named.jpg"), str(photos), "--json")
    stdout, stderr = result.stdout, result.stderr
    assert result.exit_code == 1, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    fifo = "is a FIFO (named pipe), not a regular file"
    assert rows[0] == {"image": str(tmp_path / "named.jpg"), "error": fifo}
    assert rows[3] == {"image": str(photos / "pipe.jpg"), "error": fifo}
    assert [row["image"] for i, row in enumerate(rows) if i not in (0, 3)] == [
        str(photos / "a.jpg"), str(photos / "b.jpg"), str(photos / "sub/c.jpg")]
    assert all(len(rows[i]["predictions"]) == 4 for i in (1, 2, 4))
    assert stderr.splitlines() == [f"flowerml: error: {tmp_path}/named.jpg: {fifo}",
                                   f"flowerml: error: {photos}/pipe.jpg: {fifo}",
                                   "flowerml: 2 of 5 inputs could not be predicted"]


def test_a_closed_stdout_ends_predict_quietly_with_141(tiny_run: StoreAndCache,
                                                       photos: Path) -> None:
    """`flowerml predict DIR | head -2`: the reader leaves, and predict ends as a Unix tool
    does, without a traceback, a message or a misleading exit 1. The read end is closed before
    predict writes (it takes seconds to start), so its first row meets the closed pipe."""
    read_end, write_end = os.pipe()
    process = predict_process(tiny_run, str(photos), stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    os.close(read_end)
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (141, b"")
