"""An addition's SOURCE read into labelled images, each checked and staged for publishing.

`flowerml ingest --add SOURCE` takes one of:

- a folder, local or an `s3://bucket/prefix`, of class folders: a folder's name is a label
  number (`7`, `007`) or one of the dataset's class names (any case); the files below it named
  like images are that class's (hidden names skipped);
- a `.csv` (columns `path` and `label`) or `.jsonl` (objects with `path` and `label`) list,
  local or on S3: `path` is relative to the list's folder, an absolute path inside it, or an
  `s3://` URI; `label` a number or a class name.

Every bad input is refused before anything is read or published, with one line naming the
file, row or folder (`AdditionError`): an unknown class, a label out of range, a path outside
the source root, a list without the needed columns, a source with no image. Each image is then
read (at most `MAX_IMAGE_BYTES`), hashed and checked as ingest checks the archive's
(`flowerml.data.archive_survey.check_jpeg`: a JPEG that decodes, under PIL's bomb limit); one
that fails is set aside with its reason, the others staged under the cache by sha256.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flowerml.core.errors import DataError
from flowerml.core.files import sha256_hex, write_atomically
from flowerml.data.archive_survey import check_jpeg
from flowerml.data.sync import parallel_map
from flowerml.io.storage import ObjectNotFound, ObjectTooLarge, S3Options, Store
from flowerml.io.storage_open import open_store

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_SUFFIXES = (".csv", ".jsonl")
MAX_IMAGE_BYTES = 512 * 2**20  # as scoring reads a user's image (flowerml.serving.inputs)
MAX_LIST_BYTES = 256 * 2**20
LIST_COLUMNS = ("path", "label")


class AdditionError(DataError):
    """A SOURCE of `ingest --add` that cannot be added; one line naming the file or row."""


@dataclass(frozen=True)
class LabelledImage:
    """One image SOURCE names: where it is (`store`, `key`), its label, and how it is shown."""

    shown: str
    label: int
    store: Store
    key: str


@dataclass(frozen=True)
class CheckedImage:
    """A labelled image read and checked: staged at `staged` when it passed, else `problem`."""

    shown: str
    label: int
    sha256: str
    size: int
    staged: Path | None
    problem: str | None = None


def resolve_label(text: object, class_names: Sequence[str], where: str) -> int:
    """A label number (zero-padded or not) or a class name (any case) as a 1-based label."""
    value = str(text).strip()
    count = len(class_names)
    if value.isdigit():
        label = int(value)
        if not 1 <= label <= count:
            raise AdditionError(f"{where}: label {value} is out of range 1..{count}")
        return label
    by_name = {name.casefold(): label for label, name in enumerate(class_names, start=1)}
    if value.casefold() not in by_name:
        raise AdditionError(f"{where}: {value!r} is not a class of the dataset (a label "
                            f"1..{count} or one of its class names)")
    return by_name[value.casefold()]


def split_uri(source: str) -> tuple[str, str]:
    """(the store's URI, the key below it) for a file: its folder and its name."""
    parent, _, name = source.rstrip("/").rpartition("/")
    return parent or ".", name


def open_source_store(uri: str, s3: S3Options | None) -> Store:
    return open_store(uri, s3=s3, name="SOURCE")


def read_source(source: str, class_names: Sequence[str], *,
                s3: S3Options | None = None) -> list[LabelledImage]:
    """Every labelled image SOURCE names, checked for bad input before any image is read."""
    is_list = source.lower().endswith(LIST_SUFFIXES)
    images = (read_list(source, class_names, s3) if is_list
              else read_folder(source, class_names, s3))
    if not images:
        raise AdditionError(f"{source}: no images to add")
    return images


def read_folder(source: str, class_names: Sequence[str],
                s3: S3Options | None) -> list[LabelledImage]:
    """The images of a folder of class folders (local or s3://)."""
    if not source.startswith("s3://") and not Path(source).is_dir():
        raise AdditionError(f"{source}: not a folder of class folders, nor a .csv or .jsonl "
                            "list")
    store = open_source_store(source, s3)
    return [LabelledImage(store.location(key), resolve_label(
                folder, class_names, f"{store.location(folder)}/"), store, key)
            for folder, key in class_folder_images(store, "SOURCE")]


def class_folder_images(store: Store, what: str,
                        error: type[DataError] = AdditionError) -> list[tuple[str, str]]:
    """(class folder, key) of each image file in a folder of class folders (`store`'s root),
    sorted by key; hidden names skipped, a file outside a class folder refused (`what`
    names the folder in the message), each local file checked to stay inside the root."""
    images = []
    for info in store.list(""):
        parts = info.key.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) == 1:
            raise error(f"{store.location(info.key)}: not in a class folder ({what} holds one "
                        "folder per class)")
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        check_inside(store, info.key, error)
        images.append((parts[0], info.key))
    return sorted(images, key=lambda image: image[1])


def check_inside(store: Store, key: str, error: type[DataError] = AdditionError) -> None:
    """A local file (a symbolic link, say) must not lead outside the source's root."""
    root = getattr(store, "root", None)
    if root is not None and not (root / key).resolve().is_relative_to(root):
        raise error(f"{store.location(key)}: outside the source root {root}")


def read_list(source: str, class_names: Sequence[str],
              s3: S3Options | None) -> list[LabelledImage]:
    """The images a .csv or .jsonl list names, each row checked."""
    folder, name = split_uri(source)
    store = open_source_store(folder, s3)
    try:
        raw = store.get_bytes(name, limit=MAX_LIST_BYTES)
    except (ObjectNotFound, ObjectTooLarge) as error:
        raise AdditionError(f"{source}: {error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise AdditionError(f"{source}: not UTF-8 text") from None
    rows = csv_rows(source, text) if name.lower().endswith(".csv") else jsonl_rows(source, text)
    s3_stores: dict[str, Store] = {}
    images = []
    for where, path, label_text in rows:
        label = resolve_label(label_text, class_names, where)
        image_store, key = locate(path, store, where, s3_stores, s3)
        images.append(LabelledImage(image_store.location(key), label, image_store, key))
    return images


def csv_rows(source: str, text: str) -> Iterator[tuple[str, str, str]]:
    """(where, path, label) of each data row; the header must name both columns."""
    reader = csv.DictReader(io.StringIO(text))
    found = [column.strip() for column in reader.fieldnames or []]
    missing = [column for column in LIST_COLUMNS if column not in found]
    if missing:
        raise AdditionError(f"{source}: needs the columns {', '.join(LIST_COLUMNS)} in its "
                            f"header (found: {', '.join(found) or 'none'})")
    reader.fieldnames = found
    for row in reader:
        where = f"{source} row {reader.line_num}"
        values = [row.get(column) for column in LIST_COLUMNS]
        if any(value is None or not value.strip() for value in values):
            raise AdditionError(f"{where}: needs a path and a label")
        yield where, values[0].strip(), values[1].strip()


def jsonl_rows(source: str, text: str) -> Iterator[tuple[str, str, str]]:
    """(where, path, label) of each non-blank line, an object with `path` and `label`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise AdditionError(f"{where}: not a JSON object") from None
        if not isinstance(row, dict) or any(
                not isinstance(row.get(key), str | int) or isinstance(row.get(key), bool)
                for key in LIST_COLUMNS):
            raise AdditionError(f"{where}: needs the keys {', '.join(LIST_COLUMNS)} (path a "
                                "string, label a number or a class name)")
        yield where, str(row["path"]), str(row["label"])


def locate(path: str, root: Store, where: str, s3_stores: dict[str, Store],
           s3: S3Options | None) -> tuple[Store, str]:
    """The store and key of a list's `path`: an s3:// URI, or a file inside the list's root."""
    if path.startswith("s3://"):
        bucket, _, key = path.removeprefix("s3://").partition("/")
        if not key:
            raise AdditionError(f"{where}: {path} names no object")
        if bucket not in s3_stores:
            s3_stores[bucket] = open_source_store(f"s3://{bucket}", s3)
        return s3_stores[bucket], key
    root_dir = getattr(root, "root", None)
    if root_dir is None:  # a list on S3: its relative paths are keys beside it
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise AdditionError(f"{where}: {path} is outside the source root {root.uri}")
        return root, str(relative)
    resolved = (root_dir / path).resolve()
    if not resolved.is_relative_to(root_dir):
        raise AdditionError(f"{where}: {path} is outside the source root {root_dir}")
    return root, resolved.relative_to(root_dir).as_posix()


# --------------------------------------------------------------------------------------------
# Reading, checking and staging each image


def staging_folder(cache_dir: Path, dataset: str) -> Path:
    return cache_dir / dataset / "additions"


def check_images(images: Sequence[LabelledImage], folder: Path, workers: int | None = None,
                 advance: Callable[[], None] = lambda: None) -> list[CheckedImage]:
    """Each image read, hashed and checked on threads, in SOURCE's order; those that pass are
    staged in `folder` as `<sha256>`, where publishing reads them (checked again) to upload."""
    folder.mkdir(parents=True, exist_ok=True)

    def check(image: LabelledImage) -> CheckedImage:
        try:
            data = image.store.get_bytes(image.key, limit=MAX_IMAGE_BYTES)
        except ObjectNotFound:
            raise AdditionError(f"{image.shown}: not found") from None
        except ObjectTooLarge:
            return CheckedImage(image.shown, image.label, "", 0, None,
                                f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        digest = sha256_hex(data)
        problem = check_jpeg(data)
        staged = None
        if problem is None:
            staged = folder / digest
            if not staged.is_file():
                write_atomically(staged, data)
        return CheckedImage(image.shown, image.label, digest, len(data), staged, problem)

    checked = []
    for result in parallel_map(check, images, workers):
        checked.append(result)
        advance()
    return checked
