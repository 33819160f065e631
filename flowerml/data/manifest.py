"""The dataset manifest: its type, its writer and its reader, and the CURRENT pointer to it.

A published version is described by `datasets/<name>/<version>/manifest.json` (class names,
counts, source checksums and one `ManifestEntry` per image: split, label, key, size, sha256),
and `datasets/<name>/CURRENT` names the current version with the manifest's sha256. This module
is the one owner of both documents:

- the writer: `write_manifest` (after the images it lists) and `write_current` (after the
  manifest), called by ingest;
- the reader: `resolve_dataset` picks a version, checks its manifest against CURRENT's sha256,
  every entry once, and that the entries still hash to the version's name (`content_version`),
  and returns a `PublishedDataset` of typed `ManifestEntry`s.

`"synthetic": true` marks a version ingested from an archive `flowerml synth` drew; it is part
of the version's identity, so it cannot be edited away either.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from flowerml.core.documents import (
    DocumentError,
    Sha256,
    StoredDocument,
    field_message,
    plain,
    read_document,
)
from flowerml.core.errors import DataError, DatasetNotFound
from flowerml.data import flowers
from flowerml.io.storage import ObjectNotFound, PreconditionFailed, Store

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
QUARANTINE = "quarantine.json"
VERSION_CHARS = 12
SPLITS = flowers.SPLITS

Split = Literal[SPLITS]  # type: ignore[valid-type]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def dataset_prefix(dataset: str) -> str:
    return f"datasets/{dataset}"


def version_prefix(dataset: str, version: str) -> str:
    return f"{dataset_prefix(dataset)}/{version}"


def manifest_key(dataset: str, version: str) -> str:
    return f"{version_prefix(dataset, version)}/{MANIFEST}"


def current_key(dataset: str) -> str:
    return f"{dataset_prefix(dataset)}/{CURRENT}"


def quarantine_key(dataset: str, version: str) -> str:
    return f"{version_prefix(dataset, version)}/{QUARANTINE}"


def encode_json(value: object) -> bytes:
    """The canonical bytes of a JSON document: sorted keys, no spaces (stable sha256s)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def check_name(kind: str, value: str) -> str:
    # Both become parts of store keys and local paths: refuse anything that could escape them.
    if not isinstance(value, str) or not _NAME.match(value):
        raise DataError(f"invalid {kind} {value!r}: letters, digits, '.', '_' and '-' only")
    return value


# --------------------------------------------------------------------------------------------
# The type


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True))
class ManifestEntry:
    """One published image; `key` is its path under the version, `<split>/<NNN>/<image>`.
    Validated when built and when read: nothing in a manifest can name a key outside its split
    (fields it does not declare are ignored)."""

    split: Split
    label: Annotated[int, Field(ge=1)]
    image: str
    key: str
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256

    @field_validator("key")
    @classmethod
    def _inside_its_split(cls, key: str, info: ValidationInfo) -> str:
        # Keys become local paths in the cache: refuse anything that could escape the split.
        split = info.data.get("split")
        if split is not None and not (key.startswith(f"{split}/") and "\\" not in key and all(
                part not in ("", ".", "..") for part in key.split("/"))):
            raise ValueError(f"not a key under {split}/ (no empty, '.', '..' or '\\' part)")
        return key


class ManifestClass(StoredDocument):
    label: int
    dir: str  # the class's folder under a split: the zero-padded label
    name: str


class SkippedImage(StoredDocument):
    """An image an addition did not add: `path` as SOURCE named it, `key` the parent's entry
    that already holds the same bytes."""

    path: str
    key: str


class RejectedImage(StoredDocument):
    """An image an addition set aside because it failed ingest's checks, and why."""

    path: str
    reason: str


class AdditionRecord(StoredDocument):
    """What `flowerml ingest --add` put in a version on top of its parent: the SOURCE, the
    target split, the added images per split and class label, and those it skipped: already in
    that split, already in another split (leakage), or failing the checks."""

    source: str
    split: Split
    added: dict[str, dict[str, int]]
    already_present: list[SkippedImage]
    leakage: list[SkippedImage]
    rejected: list[RejectedImage]


class Manifest(StoredDocument):
    """`datasets/<name>/<version>/manifest.json`. `synthetic` and `quarantined_images` are
    absent from manifests written before they existed (read as false, and from
    quarantine.json). A version an addition published names its `parent` and the `addition`,
    and `objects_in` lists, by version, the keys whose objects stay in an earlier version's
    folder (every other key is under this version's)."""

    dataset: str
    version: str
    synthetic: StrictBool = False
    classes: list[ManifestClass]
    counts: dict[str, int]
    quarantined: int
    quarantined_images: list[str] | None = None
    sources: dict[str, Any]
    files: list[ManifestEntry]
    parent: str | None = None
    addition: AdditionRecord | None = None
    objects_in: dict[str, list[str]] | None = None

    @field_validator("classes")
    @classmethod
    def _labels_one_to_n(cls, classes: list[ManifestClass]) -> list[ManifestClass]:
        classes = sorted(classes, key=lambda c: c.label)
        if [c.label for c in classes] != list(range(1, len(classes) + 1)):
            raise ValueError(f"labels are not 1..{len(classes)}")
        return classes


class CurrentPointer(StoredDocument):
    """`datasets/<name>/CURRENT`: the current version and its manifest's sha256 (ingest always
    writes it; a CURRENT without it, written by hand, still names the version)."""

    version: str
    manifest_sha256: Sha256 | None = None


class QuarantinedImage(StoredDocument):
    """One entry of `quarantine.json` (a list): an image ingest set aside, and why."""

    image: str
    split: str
    label: int
    reason: str


Quarantine = list[QuarantinedImage]


class DamagedManifest(DocumentError, DataError):
    """A manifest, CURRENT or quarantine.json that does not read as its document."""


def count_splits(entries: Sequence[ManifestEntry]) -> dict[str, int]:
    return {s: sum(1 for e in entries if e.split == s) for s in SPLITS}


def content_version(entries: Sequence[ManifestEntry], quarantined_images: Sequence[str],
                    synthetic: bool, class_names: Sequence[str] | None = None) -> str:
    """A prefix of the sha256 over the sorted entries: same content, same version.

    Written by ingest and recomputed by every read, so a manifest edited after publishing (and
    CURRENT re-hashed to match) no longer passes for the version it names. Class names other
    than Flowers-102's (a dataset of one's own classes) are part of the identity: the same
    images under renamed class folders are another version.
    """
    canonical: list = sorted([e.split, e.label, e.image, e.sha256] for e in entries)
    canonical.append(sorted(quarantined_images))
    if synthetic:  # appended only then, so real data keeps the ids it always had
        canonical.append(["synthetic"])
    if class_names is not None and list(class_names) != flowers.class_names_for(
            len(class_names)):  # likewise: Flowers-102's versions keep their ids
        canonical.append(["classes", *class_names])
    return hashlib.sha256(encode_json(canonical)).hexdigest()[:VERSION_CHARS]


@dataclass(frozen=True)
class PublishedDataset:
    """One published version: its identity, class names and the manifest's file entries."""

    dataset: str
    version: str
    manifest_sha256: str
    class_names: tuple[str, ...]  # index i is label i + 1
    files: tuple[ManifestEntry, ...]
    synthetic: bool = False  # drawn by `flowerml synth`, not photographs
    object_versions: Mapping[str, str] = field(default_factory=dict)  # key -> version folder

    def object_key(self, entry: ManifestEntry) -> str:
        """The store key of an entry's image: under this version, or the earlier one whose
        folder holds it (a version an addition published keeps its parent's objects there)."""
        version = self.object_versions.get(entry.key, self.version)
        return f"{version_prefix(self.dataset, version)}/{entry.key}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_files(self, split: str) -> list[ManifestEntry]:
        """The manifest entries of one split, sorted by key."""
        check_split(split)
        return sorted((f for f in self.files if f.split == split), key=lambda f: f.key)

    def split_sha256(self, split: str) -> str:
        """The identity of one split's images: the sha256 of its entries (key, label, image
        sha256), one line each in key order. A version that only added training images has
        the test split's digest of its parent, so models of either are gated on the same
        test images (cards record it as `test_manifest_sha256`)."""
        lines = "".join(f"{f.key}\t{f.label}\t{f.sha256}\n" for f in self.split_files(split))
        return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The writer


def build_manifest(dataset: str, version: str, class_names: Sequence[str],
                   entries: Sequence[ManifestEntry], *, quarantined_images: Sequence[str],
                   sources: dict, synthetic: bool = False, **lineage: Any) -> Manifest:
    """The manifest document; `lineage` (parent, addition, objects_in) only for a version an
    addition published, so an ingest's manifest keeps the fields (and bytes) it always had."""
    if version != content_version(entries, quarantined_images, synthetic, class_names):
        raise ValueError(f"version {version!r} is not the content version of these entries")
    return Manifest(**lineage,
        dataset=dataset, version=version, synthetic=synthetic,
        classes=[ManifestClass(label=label, dir=flowers.class_dir(label), name=name)
                 for label, name in enumerate(class_names, start=1)],
        counts=count_splits(entries), quarantined=len(quarantined_images),
        quarantined_images=sorted(quarantined_images), sources=sources, files=list(entries))


def write_manifest(store: Store, dataset: str, version: str, class_names: Sequence[str],
                   entries: Sequence[ManifestEntry], *, quarantined_images: Sequence[str],
                   sources: dict, synthetic: bool = False, **lineage: Any) -> bytes:
    """Write the version's manifest.json, after every image it lists; its bytes. `version`
    must be `content_version` of the entries."""
    raw = encode_json(plain(build_manifest(dataset, version, class_names, entries,
                                           quarantined_images=quarantined_images,
                                           sources=sources, synthetic=synthetic, **lineage)))
    store.put_bytes(manifest_key(dataset, version), raw)
    return raw


def current_bytes(version: str, manifest: bytes) -> bytes:
    """CURRENT's content naming `version`, with its manifest's sha256."""
    return encode_json(plain(CurrentPointer(
        version=version, manifest_sha256=hashlib.sha256(manifest).hexdigest())))


def write_current(store: Store, dataset: str, version: str, manifest: bytes) -> None:
    """Point CURRENT at `version`, recording its manifest's sha256; after the manifest."""
    store.put_bytes(current_key(dataset), current_bytes(version, manifest))


def swap_current(store: Store, dataset: str, version: str, manifest: bytes, etag: str) -> bool:
    """Compare-and-swap CURRENT from the content with `etag` to `version`; False when another
    writer moved it first (on 412, or when a store whose conditional writes are not atomic
    let another writer's land after ours: re-read and decide again)."""
    data = current_bytes(version, manifest)
    try:
        store.put_bytes(current_key(dataset), data, if_match=etag)
        return store.get_bytes(current_key(dataset)) == data
    except (PreconditionFailed, ObjectNotFound):
        return False


# --------------------------------------------------------------------------------------------
# The reader


def not_published(store: Store, dataset: str, version: str) -> DatasetNotFound:
    return DatasetNotFound(f"dataset '{dataset}' version '{version}' is not published on "
                           f"{store.uri} (run flowerml ingest)")


def read_current(store: Store, dataset: str) -> dict | None:
    """CURRENT's {"version", "manifest_sha256"}, or None when nothing is published."""
    return read_current_with_etag(store, dataset)[0]


def read_current_with_etag(store: Store, dataset: str) -> tuple[dict | None, str | None]:
    """CURRENT as `read_current` reads it, and the etag of exactly that content."""
    key = current_key(dataset)
    try:
        raw, etag = store.get_with_etag(key)
    except ObjectNotFound:
        return None, None
    return plain(read_document(CurrentPointer, raw, key, DamagedManifest)), etag


def resolve_dataset(store: Store, dataset: str, version: str | None = None) -> PublishedDataset:
    """The published version `version` of `dataset` (CURRENT's when None), manifest verified."""
    check_name("dataset name", dataset)
    if version is not None:
        check_name("dataset version", version)
    current = read_current(store, dataset)
    if version is None:
        if current is None:
            raise not_published(store, dataset, "CURRENT")
        version = check_name("dataset version", current["version"])
    key = manifest_key(dataset, version)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        raise not_published(store, dataset, version) from None
    digest = hashlib.sha256(raw).hexdigest()
    # CURRENT records the manifest's sha256, so the current version's file list is checked end
    # to end; an older version's manifest is trusted as read (its files are still verified).
    where = store.location(key)
    if current and current["version"] == version and current.get("manifest_sha256") not in (
            None, digest):
        raise DataError(f"{where}: sha256 {digest} differs from the "
                        f"{current['manifest_sha256']} that {current_key(dataset)} records")
    return parse_manifest(where, raw, dataset, version, digest,
                          read_quarantine=lambda: read_quarantine_names(store, dataset, version))


def read_quarantine_names(store: Store, dataset: str, version: str) -> list[str]:
    """The quarantined images' names from quarantine.json, for manifests written before the
    manifest listed them itself."""
    key = quarantine_key(dataset, version)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        raise DataError(f"{store.location(key)}: missing, and the manifest does not name its "
                        "quarantined images") from None
    return [item.image for item in read_quarantine(store.location(key), raw)]


def read_quarantine(where: str, raw: bytes) -> list[QuarantinedImage]:
    """quarantine.json read from `where`, validated (DamagedManifest: one line, the field)."""
    return read_document(Quarantine, raw, where, DamagedManifest)


def read_manifest(where: str, raw: bytes) -> Manifest:
    """The manifest `raw` read from `where`, validated (DamagedManifest: one line, the field)."""
    return read_document(Manifest, raw, where, DamagedManifest)


def parse_manifest(where: str, raw: bytes, dataset: str, version: str, digest: str, *,
                   read_quarantine: Callable[[], list[str]] | None = None) -> PublishedDataset:
    """The manifest `raw` read from `where`, every entry checked once, and its entries checked
    to still hash to `version`. `read_quarantine` names the quarantined images when an older
    manifest counted them without naming them."""
    manifest = read_manifest(where, raw)
    if manifest.version != version:
        raise DamagedManifest(f"{where}: names version {manifest.version!r}, not {version!r}")
    names = tuple(c.name for c in manifest.classes)
    for index, entry in enumerate(manifest.files):
        if entry.label > len(names):
            raise DamagedManifest(field_message(
                where, ("files", index, "label"), f"{entry.label} is not a label of the "
                f"manifest's {len(names)} classes"))
    quarantined = manifest.quarantined_images
    if quarantined is None:
        quarantined = read_quarantine() if manifest.quarantined and read_quarantine else []
    entries = tuple(manifest.files)
    computed = content_version(entries, quarantined, manifest.synthetic, names)
    if computed != version:
        raise DamagedManifest(f"{where}: its entries hash to version {computed}, not {version}: "
                              "the manifest was changed after ingest (re-run flowerml ingest)")
    return PublishedDataset(dataset, version, digest, names, entries, manifest.synthetic,
                            object_versions(where, manifest))


def object_versions(where: str, manifest: Manifest) -> dict[str, str]:
    """`objects_in` as {key: version}, each version a valid name and each key an entry's."""
    keys = {entry.key for entry in manifest.files}
    found = {}
    for version, listed in (manifest.objects_in or {}).items():
        if not _NAME.match(version):
            raise DamagedManifest(field_message(where, ("objects_in", version),
                                                "not a version name"))
        for key in listed:
            if key not in keys:
                raise DamagedManifest(field_message(where, ("objects_in", version),
                                                    f"{key!r} is not a key of the manifest"))
            found[key] = version
    return found
