"""`flowerml ingest --add`: a new dataset version, CURRENT's plus new labelled images.

`add_images` reads SOURCE (`flowerml.data.additions`: bad input refused before anything is
read), checks and stages each image, then publishes on top of CURRENT:

- every split of the parent is kept as it is (the test split never changes by an addition);
  each new image goes to the target split (`train`, or `valid`), under
  `<split>/<NNN>/added_<sha256 prefix>.jpg`;
- an image whose bytes the parent already holds is not added: in the same split it is
  *already present*, in another one it is *leakage* (an image of test or valid never enters
  train); both are counted and named in the result and the manifest, as are images that fail
  ingest's checks (*rejected*);
- the child is content-addressed like any version (`content_version` of its entries), so the
  same add twice is the same version, and an add with nothing new publishes nothing. Only the
  new images are uploaded, under the child's folder; the parent's stay where they are
  (`objects_in` in the manifest), then the manifest, then CURRENT by compare-and-swap;
- an add killed midway leaves CURRENT on the parent: the same add again computes the same
  child and uploads only what is missing. An add that loses the swap to another re-reads
  CURRENT and applies its images again on top of it, so two racing adds both land.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowerml.core.documents import plain
from flowerml.core.errors import DatasetNotFound, TransientError
from flowerml.core.progress import NullProgress, Progress
from flowerml.data import flowers
from flowerml.data.additions import (
    AdditionError,
    CheckedImage,
    check_images,
    read_source,
    staging_folder,
)
from flowerml.data.ingest import leaves_no_empty_folders, published_manifest, upload_missing
from flowerml.data.manifest import (
    AdditionRecord,
    Manifest,
    ManifestEntry,
    PublishedDataset,
    RejectedImage,
    SkippedImage,
    check_name,
    content_version,
    count_splits,
    current_key,
    manifest_key,
    quarantine_key,
    read_current_with_etag,
    read_manifest,
    resolve_dataset,
    swap_current,
    version_prefix,
    write_manifest,
)
from flowerml.io.storage import ObjectNotFound, S3Options, Store

TARGET_SPLITS = ("train", "valid")
MAX_ATTEMPTS = 20  # swaps lost to other writers before giving up: each loss means one landed


class CurrentKeptMoving(TransientError):
    """Other writers moved CURRENT every time this add tried to: run it again."""


@dataclass
class AddResult:
    """What an add published; `to_json()` is the CLI's --json object. `version` is the version
    that holds the images (the new one, or the parent when nothing was new); `published`
    whether this add wrote it; `uploaded_bytes` only the new images' bytes."""

    dataset: str
    version: str
    parent: str
    published: bool
    source: str
    split: str
    added: dict[str, dict[str, int]]
    already_present: list[dict]
    leakage: list[dict]
    rejected: list[dict]
    counts: dict[str, int]
    uploaded: int = 0
    uploaded_bytes: int = 0
    store: str = ""
    location: str = ""
    attempts: int = 1
    added_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.added_images = sum(n for classes in self.added.values() for n in classes.values())

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The child of one parent: its entries, the new ones, and what the addition skipped."""

    parent: PublishedDataset
    parent_manifest: Manifest
    version: str
    entries: list[ManifestEntry]
    new: list[ManifestEntry]
    record: AdditionRecord


def added_image_name(sha256: str) -> str:
    return f"added_{sha256[:20]}.jpg"


def plan_addition(parent: PublishedDataset, parent_manifest: Manifest,
                  images: Sequence[CheckedImage], split: str, source: str) -> Plan:
    """The child version of `parent` with `images` added to `split`."""
    by_sha = {entry.sha256: entry for entry in parent.files}
    new: dict[str, ManifestEntry] = {}
    present, leakage, rejected = [], [], []
    for image in images:
        if image.problem is not None:
            rejected.append(RejectedImage(path=image.shown, reason=image.problem))
            continue
        known = by_sha.get(image.sha256) or new.get(image.sha256)
        if known is not None:
            skipped = SkippedImage(path=image.shown, key=known.key)
            (present if known.split == split else leakage).append(skipped)
            continue
        name = added_image_name(image.sha256)
        new[image.sha256] = ManifestEntry(split, image.label, name,
                                          f"{split}/{flowers.class_dir(image.label)}/{name}",
                                          image.size, image.sha256)
    added: dict[str, Counter] = defaultdict(Counter)
    for entry in new.values():
        added[entry.split][flowers.class_dir(entry.label)] += 1
    record = AdditionRecord(
        source=source, split=split,
        added={s: dict(sorted(c.items())) for s, c in added.items()},
        already_present=present, leakage=leakage, rejected=rejected)
    entries = sorted([*parent.files, *new.values()], key=lambda e: e.key)
    version = content_version(entries, parent_manifest.quarantined_images or [],
                              parent.synthetic, parent.class_names)
    return Plan(parent, parent_manifest, version, entries, list(new.values()), record)


def check_one_label_per_image(images: Sequence[CheckedImage]) -> None:
    """The same bytes twice in SOURCE under two labels cannot both be right."""
    first: dict[str, CheckedImage] = {}
    for image in images:
        if image.problem is not None:
            continue
        seen = first.setdefault(image.sha256, image)
        if seen.label != image.label:
            raise AdditionError(f"{image.shown}: the same image as {seen.shown}, with label "
                                f"{image.label} instead of {seen.label}")


def objects_in(plan: Plan) -> dict[str, list[str]]:
    """Where the parent's objects stay: its own `objects_in`, the rest in its folder."""
    parent = plan.parent
    by_version: dict[str, list[str]] = defaultdict(list)
    for entry in parent.files:
        by_version[parent.object_versions.get(entry.key, parent.version)].append(entry.key)
    return {version: sorted(keys) for version, keys in sorted(by_version.items())}


def publish_child(store: Store, dataset: str, plan: Plan, staged: Path,
                  progress: Progress) -> tuple[bytes, int, int]:
    """The new images, the parent's quarantine.json and the manifest (last) of the child;
    (manifest, images uploaded, bytes uploaded). A child already published is kept."""
    prefix = version_prefix(dataset, plan.version)
    with store.writing_under(prefix):
        manifest = published_manifest(store, dataset, plan.version)
        if manifest is not None:
            return manifest, 0, 0
        uploaded, sent, _ = upload_missing(store, prefix, plan.new,
                                           lambda entry: staged / entry.sha256, progress)
        try:
            quarantine = store.get_bytes(quarantine_key(dataset, plan.parent.version))
            store.put_bytes(quarantine_key(dataset, plan.version), quarantine)
        except ObjectNotFound:
            pass  # the parent lists its quarantined images in its manifest
        parent = plan.parent_manifest
        manifest = write_manifest(
            store, dataset, plan.version, plan.parent.class_names, plan.entries,
            quarantined_images=parent.quarantined_images or [], sources=parent.sources,
            synthetic=parent.synthetic, parent=plan.parent.version,
            addition=plan.record, objects_in=objects_in(plan))
    return manifest, uploaded, sent


def read_parent(store: Store, dataset: str) -> tuple[PublishedDataset, Manifest, str]:
    """CURRENT's version, verified as training reads it, its manifest document, and the etag
    of the CURRENT it was read from."""
    current, etag = read_current_with_etag(store, dataset)
    if current is None or etag is None:
        raise DatasetNotFound(f"dataset '{dataset}' has no CURRENT version on {store.uri}: "
                              "ingest it before adding to it (flowerml ingest)")
    parent = resolve_dataset(store, dataset, current["version"])
    key = manifest_key(dataset, parent.version)
    return parent, read_manifest(store.location(key), store.get_bytes(key)), etag


@leaves_no_empty_folders
def add_images(store: Store, dataset: str, source: str, cache_dir: Path, *,
               split: str = "train", s3: S3Options | None = None, workers: int | None = None,
               progress: Progress | None = None) -> AddResult:
    """Publish CURRENT plus the labelled images SOURCE names as a new version of `dataset`."""
    progress = progress or NullProgress()
    check_name("dataset name", dataset)
    if split not in TARGET_SPLITS:
        raise AdditionError(f"--split {split}: an addition goes to train or valid (the test "
                            "split never changes)")
    store.check()
    store.check_writable()
    parent, _, _ = read_parent(store, dataset)
    images = read_source(source, parent.class_names, s3=s3)  # bad input: before any read
    progress.start("checking images", len(images))
    staged = staging_folder(cache_dir, dataset)
    checked = check_images(images, staged, workers, progress.advance)
    check_one_label_per_image(checked)
    uploaded = sent = 0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        parent, parent_manifest, etag = read_parent(store, dataset)
        plan = plan_addition(parent, parent_manifest, checked, split, source)
        if not plan.new:  # nothing new on top of CURRENT: the same add again, or already landed
            return result(store, dataset, plan, False, uploaded, sent, attempt)
        manifest, more, more_bytes = publish_child(store, dataset, plan, staged, progress)
        uploaded, sent = uploaded + more, sent + more_bytes
        if swap_current(store, dataset, plan.version, manifest, etag):
            return result(store, dataset, plan, True, uploaded, sent, attempt)
        # Lost to another writer: read CURRENT again and apply these images on top of it.
    raise CurrentKeptMoving(f"{store.location(current_key(dataset))}: moved by other writers "
                            f"{MAX_ATTEMPTS} times during this add; run it again")


def result(store: Store, dataset: str, plan: Plan, published: bool, uploaded: int, sent: int,
           attempts: int) -> AddResult:
    """The result of `plan`: its child when this add published it, else the parent (CURRENT),
    which already holds every image."""
    version = plan.version if published else plan.parent.version
    record = plain(plan.record)
    return AddResult(dataset, version, plan.parent.version, published, record["source"],
                     record["split"], record["added"], record["already_present"],
                     record["leakage"], record["rejected"], count_splits(plan.entries),
                     uploaded, sent, store.uri,
                     store.location(version_prefix(dataset, version)), attempts)
