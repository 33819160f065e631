"""flowerml.serving.inputs: the one rule set by which `flowerml predict` and `flowerml score` expand what
a user names (files, folders, globs, list files, s3:// keys and prefixes) into image keys."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest

from flowerml.io.storage import S3Options
from flowerml.io.storage_s3 import S3Store
from flowerml.serving.inputs import (
    IMAGE_SUFFIXES,
    InputError,
    expand_inputs,
    json_list_entries,
    list_input,
)


def write_files(folder: Path, *names: str) -> Path:
    """Empty files (or a name's own bytes, where a test reads them) under `folder`."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    return folder


def names(arguments: list, s3: S3Options | None = None) -> list[tuple[str, str | None]]:
    return [(item.name, item.error) for item in expand_inputs(arguments, s3)]


# --- folders ---------------------------------------------------------------------------------


def test_a_folder_gives_its_images_recursively_in_sorted_order(tmp_path: Path) -> None:
    write_files(tmp_path / "photos", "b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp",
                "A0.jpg", "notes.txt", ".hidden.jpg", ".cache/e.jpg", "sub/Thumbs.db")
    folder = str(tmp_path / "photos")
    assert names([folder]) == [(f"{folder}/{n}", None) for n in
                               ("A0.jpg", "a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp")]
    assert [item.path for item in expand_inputs([folder])][0] == Path(folder, "A0.jpg")


def test_a_folder_is_walked_without_hidden_names_or_linked_folders(tmp_path: Path) -> None:
    """A symlinked folder is not entered (a loop would never end); a FIFO named like an image
    is kept, to be that image's error when it is read (never a read that blocks)."""
    folder = write_files(tmp_path / "photos", "b.jpg", "a.jpg", "notes.txt", "sub/f.jpg",
                         ".cache/x.jpg")
    (folder / "loop").symlink_to(folder)
    os.mkfifo(folder / "pipe.jpg")
    listing = list_input(str(folder))
    assert list(listing.stream()) == ["a.jpg", "b.jpg", "notes.txt", "pipe.jpg", "sub/f.jpg"]
    assert listing.only_images and listing.root == str(folder.resolve())
    assert [item.name for item in expand_inputs([folder])] == [
        f"{folder}/{n}" for n in ("a.jpg", "b.jpg", "pipe.jpg", "sub/f.jpg")]
    assert list(list_input(str(folder / "sub" / "f.jpg")).stream()) == ["f.jpg"]


def test_a_folder_without_images_is_a_failed_input(tmp_path: Path) -> None:
    write_files(tmp_path / "empty", "notes.txt")
    assert names([tmp_path / "empty"]) == [
        (str(tmp_path / "empty"), f"no images in this folder (looked for "
                                  f"{', '.join(IMAGE_SUFFIXES)})")]


# --- files and patterns ----------------------------------------------------------------------


def test_files_are_taken_as_named_whatever_their_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "odd[1].jpg").write_bytes(b"")  # pattern characters, but the file exists
    os.mkfifo(tmp_path / "pipe.jpg")
    arguments = [tmp_path / "notes.md", str(tmp_path / "odd[1].jpg"), str(tmp_path / "none.jpg"),
                 str(tmp_path / "pipe.jpg"), ""]
    assert names(arguments) == [(str(tmp_path / "notes.md"), None),
                                (str(tmp_path / "odd[1].jpg"), None),
                                (str(tmp_path / "none.jpg"), "no such file or folder"),
                                (str(tmp_path / "pipe.jpg"),
                                 "is a FIFO (named pipe), not a regular file"),
                                ("", "must not be empty")]


def test_patterns_match_files_and_folders_below_their_folder(tmp_path: Path) -> None:
    """`*`, `?` and `[...]` stay within one folder, `**` spans any number; a folder that
    matches gives its images, as a shell's expansion of the pattern would; only images."""
    write_files(tmp_path / "x", "2.jpg", "1.jpg", "sub/3.jpg", "sub/4.jpeg", "readme.md",
                "a/deep/b1.y.z", "a/b2.x")
    x = f"{tmp_path}/x"
    assert names([f"{x}/*.jpg"]) == [(f"{x}/1.jpg", None), (f"{x}/2.jpg", None)]
    assert [n for n, _ in names([f"{x}/**/*.jp*g"])] == [
        f"{x}/1.jpg", f"{x}/2.jpg", f"{x}/sub/3.jpg", f"{x}/sub/4.jpeg"]
    assert names([f"{x}/s*"]) == [(f"{x}/sub/3.jpg", None), (f"{x}/sub/4.jpeg", None)]
    assert list(list_input(f"{x}/sub/[!4].jp*g").stream()) == ["3.jpg"]
    assert list(list_input(f"{x}/a/**/b?.[!x]*").stream()) == ["deep/b1.y.z"]
    assert names([f"{x}/*.png", f"{x}/*.md"]) == [
        (f"{x}/*.png", "no file matches this pattern"),
        (f"{x}/*.md", "no image matches this pattern")]
    with pytest.raises(InputError) as refused:
        list_input(f"{tmp_path}/none/*.jpg")
    assert str(refused.value) == f"INPUT {tmp_path}/none/*.jpg: no such folder {tmp_path}/none"


# --- list files ------------------------------------------------------------------------------


def test_a_list_names_keys_beside_it_paths_and_s3_objects(tmp_path: Path, s3_bucket: str,
                                                          s3_options: S3Options) -> None:
    """predict reads a list (and an S3 prefix) as score does: relative entries from the list's
    folder, absolute paths from disk, s3:// URIs from their bucket, every entry tried."""
    folder = write_files(tmp_path / "photos", "a.jpg", "notes.txt", "sub/b.jpg")
    inbox = S3Store(s3_bucket, "inbox", s3_options)
    inbox.put_bytes("c.jpg", b"c-bytes")
    inbox.put_bytes("d/e.png", b"e-bytes")
    (folder / "todo.txt").write_text(f"# today\na.jpg\n\n  sub/b.jpg \nnotes.txt\n"
                                     f"{folder}/a.jpg\ns3://{s3_bucket}/inbox/c.jpg\n")
    (folder / "todo.json").write_text(json.dumps(["a.jpg", f"s3://{s3_bucket}/inbox/c.jpg"]))
    items = list(expand_inputs([folder / "todo.txt", folder / "todo.json",
                                f"s3://{s3_bucket}/inbox", f"s3://{s3_bucket}/inbox/*/*.png"],
                               s3_options))
    assert [(item.name, item.path) for item in items] == [
        (f"{folder}/a.jpg", folder / "a.jpg"), (f"{folder}/sub/b.jpg", folder / "sub" / "b.jpg"),
        (f"{folder}/notes.txt", folder / "notes.txt"), (f"{folder}/a.jpg", folder / "a.jpg"),
        (f"s3://{s3_bucket}/inbox/c.jpg", None),
        (f"{folder}/a.jpg", folder / "a.jpg"), (f"s3://{s3_bucket}/inbox/c.jpg", None),
        (f"s3://{s3_bucket}/inbox/c.jpg", None), (f"s3://{s3_bucket}/inbox/d/e.png", None),
        (f"s3://{s3_bucket}/inbox/d/e.png", None)]
    fetched = [item.fetch() for item in items if item.fetch]
    assert fetched == [b"c-bytes", b"c-bytes", b"c-bytes", b"e-bytes", b"e-bytes"]


def test_an_input_that_cannot_be_listed_is_one_row_and_the_next_goes_on(tmp_path: Path) -> None:
    folder = write_files(tmp_path / "photos", "a.jpg")
    os.mkfifo(folder / "pipe.txt")
    (folder / "half.json").write_text('["a.jpg", 7]')
    (folder / "empty.txt").write_text("# nothing today\n")
    assert names([folder / "pipe.txt", folder / "missing.txt", folder / "half.json",
                  folder / "empty.txt", folder / "a.jpg"]) == [
        (str(folder / "pipe.txt"), "is a FIFO (named pipe), not a regular file"),
        (str(folder / "missing.txt"), "no such list file"),
        (f"{folder}/a.jpg", None),  # the list's entries up to the bad one
        (str(folder / "half.json"), "entries must be non-empty strings (got 7)"),
        (str(folder / "empty.txt"), "no entries in this list file"),
        (str(folder / "a.jpg"), None)]


def test_a_json_list_is_streamed_not_read_whole() -> None:
    keys = [f"photos/{i:06d} \"q\" é.jpg" for i in range(50_000)]
    handle = io.BytesIO(json.dumps(keys, indent=1, ensure_ascii=False).encode())
    entries = json_list_entries(handle, "keys.json")
    assert next(entries) == keys[0]
    assert handle.tell() < len(handle.getvalue()) / 10  # one buffer, not the whole list
    assert [keys[0], *entries] == keys
    for text in ("[]", " [ ] "):
        assert list(json_list_entries(io.BytesIO(text.encode()), "x")) == []


@pytest.mark.parametrize(("text", "why"), [
    ('{"a": 1}', "not a JSON array of strings (it does not start with '[')"),
    ('"a.jpg"', "not a JSON array of strings (it does not start with '[')"),
    ('["a", ["b"]]', "entries must be non-empty strings (got an array)"),
    ('["a", {"b": 1}]', "entries must be non-empty strings (got an object)"),
    ('["a", " "]', "entries must be non-empty strings (got \" \")"),
    ('["a", null]', "entries must be non-empty strings (got null)"),
    ('["a" "b"]', "not a JSON array of strings (parse error: "),
    ('["a",]', "not a JSON array of strings (parse error: "),
    ('["a"', "not a JSON array of strings (parse error: "),
    ('["a"] x', "not a JSON array of strings (parse error: "),
    ("", "not a JSON array of strings (parse error: "),
    ('["f\xe9e"]', "not UTF-8 text; save the list as UTF-8"),
])
def test_a_json_list_that_is_not_an_array_of_strings_is_refused(text: str, why: str) -> None:
    data = text.encode("latin-1")
    with pytest.raises(InputError) as refused:
        list(json_list_entries(io.BytesIO(data), "keys.json"))
    assert str(refused.value).startswith(f"INPUT keys.json: {why}")
    assert "\n" not in str(refused.value)


def test_an_input_error_is_one_line_and_pickles_whole() -> None:
    """It crosses process boundaries (a Prefect task on a Dask worker)."""
    error = pickle.loads(pickle.dumps(InputError("photos/*.jpg", "no such folder photos")))
    assert (str(error), error.input, error.reason) == (
        "INPUT photos/*.jpg: no such folder photos", "photos/*.jpg", "no such folder photos")
    assert str(InputError(" ", "must not be empty")) == "INPUT must not be empty"
