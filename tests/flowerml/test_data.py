"""flowerml.data on both stores: resolve, verified sync, the decoded cache, presets, loaders."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from flowerml import data, ingest
from flowerml.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    FusedColorJitter,
    PublishedDataset,
    build_decoded_split,
    build_loaders,
    build_transforms,
    prepare_batch,
    resolve_dataset,
    sync_split,
)
from flowerml.errors import DatasetNotFound
from flowerml.ingest import FetchOptions
from flowerml.storage import LocalStore, Store

DATASET = "flowers102"
# Small images keep the suite fast: the synthetic source is 48 px, so a 32 px crop from a
# round(32 * 256 / 224) = 37 px cache.
SIZE = 32
RESOLUTION = 37


def publish(store: Store, source: Path, cache: Path) -> ingest.IngestResult:
    return ingest.ingest(str(source), store, DATASET, cache, FetchOptions())


@pytest.fixture
def published(store: Store, synthetic_source: Path, tmp_path: Path) -> PublishedDataset:
    publish(store, synthetic_source, tmp_path / "ingest-cache")
    return resolve_dataset(store, DATASET)


@pytest.fixture
def local_published(local_store: LocalStore, synthetic_source: Path,
                    tmp_path: Path) -> PublishedDataset:
    publish(local_store, synthetic_source, tmp_path / "ingest-cache")
    return resolve_dataset(local_store, DATASET)


class Recorder:
    """A Progress that remembers its calls."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, int | None]] = []
        self.advanced = 0

    def start(self, stage: str, total: int | None) -> None:
        self.stages.append((stage, total))

    def advance(self, amount: int = 1) -> None:
        self.advanced += amount


def count_downloads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key `store.get_file` is asked for from now on."""
    keys: list[str] = []
    original = store.get_file

    def get_file(key: str, path: Path) -> Path:
        keys.append(key)
        return original(key, path)

    monkeypatch.setattr(store, "get_file", get_file)
    return keys


def image_key(published: PublishedDataset, entry: dict) -> str:
    return f"datasets/{DATASET}/{published.version}/{entry['key']}"


# --------------------------------------------------------------------------------------------
# resolve_dataset


def test_resolves_current_and_explicit_version(store: Store, published: PublishedDataset) -> None:
    current = json.loads(store.get_bytes(f"datasets/{DATASET}/CURRENT"))
    assert published.version == current["version"]
    assert published.manifest_sha256 == current["manifest_sha256"]
    assert published.num_classes == 4
    assert published.class_names[0] == "pink primrose"
    train = published.split_files("train")
    assert len(train) == 8 and [e["key"] for e in train] == sorted(e["key"] for e in train)
    assert {e["split"] for e in train} == {"train"}
    assert resolve_dataset(store, DATASET, published.version) == published


def test_unknown_version_is_not_published(store: Store, published: PublishedDataset) -> None:
    with pytest.raises(DatasetNotFound) as caught:
        resolve_dataset(store, DATASET, "0123456789ab")
    assert str(caught.value) == (f"dataset '{DATASET}' version '0123456789ab' is not published "
                                 f"on {store.uri} (run flowerml ingest)")
    with pytest.raises(DatasetNotFound, match="dataset 'tulips' version 'CURRENT' is not "
                                              "published on .* \\(run flowerml ingest\\)"):
        resolve_dataset(store, "tulips")


def test_refuses_a_manifest_that_differs_from_current(local_store: LocalStore,
                                                      local_published: PublishedDataset) -> None:
    key = f"datasets/{DATASET}/{local_published.version}/manifest.json"
    manifest = json.loads(local_store.get_bytes(key))
    manifest["files"] = manifest["files"][1:]
    local_store.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(DataError, match="manifest.json: sha256 .* differs from"):
        resolve_dataset(local_store, DATASET)


@pytest.mark.parametrize("bad_key", ["../../escape.jpg", "train/001/../../../x.jpg",
                                     "valid/001/image_00001.jpg"])
def test_refuses_manifest_keys_outside_the_split(local_store: LocalStore,
                                                 local_published: PublishedDataset,
                                                 bad_key: str) -> None:
    key = f"datasets/{DATASET}/{local_published.version}/manifest.json"
    manifest = json.loads(local_store.get_bytes(key))
    manifest["files"][0]["key"] = bad_key  # the first entry is a test image
    raw = json.dumps(manifest).encode()
    local_store.put_bytes(key, raw)
    local_store.put_bytes(f"datasets/{DATASET}/CURRENT", json.dumps(
        {"version": local_published.version,
         "manifest_sha256": hashlib.sha256(raw).hexdigest()}).encode())
    with pytest.raises(DataError, match="invalid file entry"):
        resolve_dataset(local_store, DATASET)


def test_refuses_names_that_could_escape(local_store: LocalStore) -> None:
    with pytest.raises(DataError, match="invalid dataset version '../x'"):
        resolve_dataset(local_store, DATASET, "../x")


# --------------------------------------------------------------------------------------------
# sync_split


def test_sync_downloads_everything_once(store: Store, published: PublishedDataset,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = count_downloads(store, monkeypatch)
    progress = Recorder()
    root = sync_split(store, published, ("train", "valid"), tmp_path / "cache", progress=progress)
    assert root == tmp_path / "cache" / DATASET / published.version
    wanted = published.split_files("train") + published.split_files("valid")
    assert sorted(downloads) == sorted(image_key(published, e) for e in wanted)
    assert progress.stages == [("downloading train", 8), ("downloading valid", 8)]
    for entry in wanted:
        assert (root / entry["key"]).read_bytes() == store.get_bytes(image_key(published, entry))
    assert not (root / "test").exists()

    downloads.clear()
    hashed = []
    original_hash = data.sha256_of
    monkeypatch.setattr(data, "sha256_of", lambda path: hashed.append(path) or original_hash(path))
    again = Recorder()
    sync_split(store, published, ("train", "valid"), tmp_path / "cache", progress=again)
    assert downloads == [] and hashed == [] and again.stages == []


def test_sync_rechecks_a_changed_local_file(local_store: LocalStore,
                                            local_published: PublishedDataset, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    entry = local_published.split_files("train")[3]
    path = root / entry["key"]
    original = path.read_bytes()
    path.write_bytes(bytes(len(original)))  # same size, other bytes
    downloads = count_downloads(local_store, monkeypatch)
    progress = Recorder()
    sync_split(local_store, local_published, ["train"], tmp_path / "cache", progress=progress)
    assert downloads == [image_key(local_published, entry)]
    assert progress.stages == [("verifying train", 1), ("downloading train", 1)]
    assert path.read_bytes() == original


def test_sync_without_a_stamp_hashes_instead_of_downloading(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["valid"], tmp_path / "cache")
    data.stamp_path(root, "valid").unlink()
    downloads = count_downloads(local_store, monkeypatch)
    progress = Recorder()
    sync_split(local_store, local_published, ["valid"], tmp_path / "cache", progress=progress)
    assert downloads == [] and progress.stages == [("verifying valid", 8)]
    assert data.stamp_path(root, "valid").is_file()


def test_altered_image_on_the_store_is_refused(store: Store, published: PublishedDataset,
                                               tmp_path: Path) -> None:
    entry = published.split_files("train")[2]
    other = published.split_files("train")[5]
    store.put_bytes(image_key(published, entry), store.get_bytes(image_key(published, other)))
    with pytest.raises(DataError) as caught:
        sync_split(store, published, ["train"], tmp_path / "cache")
    assert str(caught.value).startswith(
        f"{image_key(published, entry)}: sha256 mismatch: the store does not match the manifest")
    root = tmp_path / "cache" / DATASET / published.version
    assert not (root / entry["key"]).exists()
    assert (root / other["key"]).is_file()
    with pytest.raises(DataError, match="sha256 mismatch"):  # and again: never trusted later
        sync_split(store, published, ["train"], tmp_path / "cache")
    assert not (root / entry["key"]).exists()


def test_missing_image_on_the_store_is_named(store: Store, published: PublishedDataset,
                                             tmp_path: Path) -> None:
    entry = published.split_files("valid")[0]
    store.delete(image_key(published, entry))
    with pytest.raises(DataError, match=f"{image_key(published, entry)}: not found .* "
                                        "the published version is incomplete"):
        sync_split(store, published, ["valid"], tmp_path / "cache")
    assert not (tmp_path / "cache" / DATASET / published.version / entry["key"]).exists()


def test_unknown_split_is_refused(local_store: LocalStore, local_published: PublishedDataset,
                                  tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'training'"):
        sync_split(local_store, local_published, ["training"], tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# The decoded cache


def test_decoded_split_is_built_once(local_store: LocalStore, local_published: PublishedDataset,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    first = build_decoded_split(root, local_published, "train", RESOLUTION, workers=2)
    entries = local_published.split_files("train")
    assert first.decoded == 8 and len(first) == 8
    assert first.images.shape == (8, RESOLUTION, RESOLUTION, 3)
    assert first.images.dtype == np.uint8
    assert first.labels.dtype == np.int64
    assert first.labels.tolist() == [e["label"] - 1 for e in entries]
    expected = data.decode_square(root / entries[4]["key"], RESOLUTION)
    assert np.array_equal(first.images[4], expected)
    mtime = first.path.stat().st_mtime_ns

    monkeypatch.setattr(data, "decode_square", lambda *args: pytest.fail("decoded again"))
    second = build_decoded_split(root, local_published, "train", RESOLUTION)
    assert second.decoded == 0 and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.images, first.images)


def test_decode_square_crops_the_centre(tmp_path: Path) -> None:
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)
    pixels[:, 20:80] = 255  # a white centre square on a black wide image
    Image.fromarray(pixels).save(tmp_path / "wide.jpg", quality=95)
    square = data.decode_square(tmp_path / "wide.jpg", 30)
    assert square.shape == (30, 30, 3)
    assert square[:, 2:-2].min() > 200  # the black sides were cropped away


def test_decoded_split_pickles_by_path(local_store: LocalStore,
                                       local_published: PublishedDataset, tmp_path: Path) -> None:
    root = sync_split(local_store, local_published, ["valid"], tmp_path / "cache")
    decoded = build_decoded_split(root, local_published, "valid", 64)
    payload = pickle.dumps(decoded)
    assert len(payload) < 4096  # not the 8 x 64 x 64 x 3 pixels
    restored = pickle.loads(payload)
    assert np.array_equal(restored.images, decoded.images)
    assert restored.labels.tolist() == decoded.labels.tolist()


def test_decoding_needs_a_synced_split(local_published: PublishedDataset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not in the local cache"):
        build_decoded_split(tmp_path, local_published, "test", RESOLUTION)


# --------------------------------------------------------------------------------------------
# Transforms


def test_tutorial_preset_is_the_tutorials_train_transform() -> None:
    steps = build_transforms("tutorial", 224, train=True).transforms
    assert [type(s) for s in steps] == [
        transforms.RandomRotation, transforms.CenterCrop, transforms.RandomVerticalFlip,
        transforms.RandomHorizontalFlip, transforms.ColorJitter, transforms.RandomGrayscale,
        transforms.ToTensor, transforms.Normalize]
    rotation, crop, vflip, hflip, jitter, grayscale, _, normalize = steps
    assert rotation.degrees == [-45.0, 45.0]
    assert crop.size == (224, 224)
    assert vflip.p == 0.5 and hflip.p == 0.5
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.8, 1.2), (0.9, 1.1), (0.9, 1.1), (-0.1, 0.1))
    assert grayscale.p == 0.025
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


def test_tutorial_preset_eval_transform() -> None:
    steps = build_transforms("tutorial", 224, train=False).transforms
    assert [type(s) for s in steps] == [transforms.Resize, transforms.CenterCrop,
                                        transforms.ToTensor, transforms.Normalize]
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    image = Image.new("RGB", (500, 375), (200, 40, 90))
    assert build_transforms("tutorial", 224, train=False)(image).shape == (3, 224, 224)
    assert build_transforms("tutorial", 192, train=True).transforms[1].size == (192, 192)


@pytest.mark.parametrize("preset", ["standard", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_cache_presets_output_uint8(preset: str, train: bool) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=torch.uint8).permute(2, 0, 1)
    out = build_transforms(preset, SIZE, train=train)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)


def test_eval_and_none_presets_centre_crop() -> None:
    image = torch.arange(3 * 256 * 256, dtype=torch.int64).remainder(251).to(torch.uint8)
    image = image.reshape(3, 256, 256)
    for preset, train in (("standard", False), ("none", True), ("none", False)):
        out = build_transforms(preset, 224, train=train)(image)
        assert torch.equal(out, image[:, 16:240, 16:240])


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(DataError) as caught:
        build_transforms("fancy", train=True)
    assert str(caught.value) == "--augment must be one of standard, tutorial, none: got 'fancy'"


def test_fused_color_jitter() -> None:
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    identity = FusedColorJitter(0, 0, 0, 0, p=1.0)
    assert torch.equal(identity(image), image)
    grey = torch.full((3, 8, 8), 120, dtype=torch.uint8)
    assert torch.equal(FusedColorJitter(0, 0, 0, 0.5, p=1.0)(grey), grey)  # hue keeps grey
    jittered = FusedColorJitter(0.2, 0.2, 0.2, 0.02, p=1.0)(image)
    assert jittered.dtype == torch.uint8 and jittered.shape == image.shape
    assert not torch.equal(jittered, image)
    brighter = FusedColorJitter(0.5, 0, 0, 0, p=1.0)
    brighter.affine = lambda draws, mean: ((1.5 * np.eye(3)).tolist(), [0.0] * 3)
    expected = (image.double() * 1.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    assert torch.equal(brighter(image), expected)
    assert torch.equal(FusedColorJitter(0.5, 0.5, 0.5, 0.1, p=0.0)(image), image)


# --------------------------------------------------------------------------------------------
# prepare_batch


def test_prepare_batch_equals_totensor_normalize() -> None:
    torch.manual_seed(2)
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(Image.fromarray(img.permute(1, 2, 0).numpy()))
                            for img in batch])
    out = prepare_batch(batch, "cpu")
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    last = prepare_batch(batch, torch.device("cpu"), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(last, expected, atol=1e-6, rtol=0)


def test_prepare_batch_passes_float_through() -> None:
    batch = torch.randn(2, 3, 8, 8)
    assert torch.equal(prepare_batch(batch, "cpu"), batch)


# --------------------------------------------------------------------------------------------
# Loaders


@pytest.mark.parametrize("preset", ["standard", "tutorial"])
@pytest.mark.parametrize("workers", [0, 2])
def test_build_loaders_yields_batches(local_store: LocalStore, local_published: PublishedDataset,
                                      tmp_path: Path, preset: str, workers: int) -> None:
    loaders = build_loaders(local_store, local_published, tmp_path / "cache", preset=preset,
                            image_size=SIZE, batch_size=3, workers=workers, seed=1)
    assert loaders.test is None
    assert loaders.num_classes == 4 and loaders.class_names == local_published.class_names
    dtype = torch.uint8 if preset == "standard" else torch.float32
    for loader in (loaders.train, loaders.valid):
        batches = list(loader)
        assert [len(targets) for _, targets in batches] == [3, 3, 2]
        for images, targets in batches:
            assert images.dtype == dtype and tuple(images.shape[1:]) == (3, SIZE, SIZE)
            assert targets.dtype == torch.int64
            assert int(targets.min()) >= 0 and int(targets.max()) < 4
    valid_labels = torch.cat([t for _, t in loaders.valid]).tolist()
    assert valid_labels == [e["label"] - 1 for e in local_published.split_files("valid")]


def test_build_loaders_is_reproducible_and_has_test(store: Store, published: PublishedDataset,
                                                    tmp_path: Path) -> None:
    def first_epoch() -> list[torch.Tensor]:
        loaders = build_loaders(store, published, tmp_path / "cache", image_size=SIZE,
                                batch_size=4, workers=1, seed=7,
                                splits=("train", "valid", "test"))
        assert loaders.test is not None and len(loaders.test.dataset) == 8
        return [images for images, _ in loaders.train]

    first, second = first_epoch(), first_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_build_loaders_refuses_unknown_preset(local_store: LocalStore,
                                              local_published: PublishedDataset,
                                              tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--augment must be one of"):
        build_loaders(local_store, local_published, tmp_path / "cache", preset="heavy")
    assert not (tmp_path / "cache").exists()


def test_shard_sampler_covers_every_item_once() -> None:
    shards = [list(data.ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(data.ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]


def test_build_eval_loader(local_store: LocalStore, local_published: PublishedDataset,
                           tmp_path: Path) -> None:
    loader = data.build_eval_loader(local_store, local_published, tmp_path / "cache",
                                    split="test", image_size=SIZE, batch_size=5, workers=0)
    images, targets = next(iter(loader))
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert targets.tolist() == [e["label"] - 1 for e in local_published.split_files("test")[:5]]
    assert os.path.isdir(tmp_path / "cache" / DATASET / local_published.version / "test")


def test_channels_last_resized_crop_matches_torchvision() -> None:
    torch.manual_seed(3)
    image = torch.randint(0, 256, (64, 80, 3), dtype=torch.uint8).permute(2, 0, 1)  # like the cache
    crop = data.ChannelsLastResizedCrop(SIZE, scale=(0.25, 1.0), antialias=True)
    params = {"top": 5, "left": 9, "height": 40, "width": 50}
    out = crop.transform(image, params)
    assert out.is_contiguous() and out.shape == (3, SIZE, SIZE)
    assert torch.equal(out, TF.resized_crop(image, **params, size=[SIZE, SIZE], antialias=True))


@pytest.mark.parametrize(("amounts", "draws", "reference"), [
    ((0.2, 0, 0, 0), [1.0, 0.5, 0.5, 0.5], lambda img: TF.adjust_brightness(img, 1.2)),
    ((0.2, 0, 0, 0), [0.0, 0.5, 0.5, 0.5], lambda img: TF.adjust_brightness(img, 0.8)),
    ((0, 0.2, 0, 0), [0.5, 1.0, 0.5, 0.5], lambda img: TF.adjust_contrast(img, 1.2)),
    ((0, 0.2, 0, 0), [0.5, 0.0, 0.5, 0.5], lambda img: TF.adjust_contrast(img, 0.8)),
    ((0, 0, 0.2, 0), [0.5, 0.5, 1.0, 0.5], lambda img: TF.adjust_saturation(img, 1.2)),
    ((0, 0, 0.2, 0), [0.5, 0.5, 0.0, 0.5], lambda img: TF.adjust_saturation(img, 0.8)),
])
def test_fused_color_jitter_matches_torchvision_factors(amounts, draws, reference) -> None:
    torch.manual_seed(4)
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    out = FusedColorJitter(*amounts, p=1.0).apply(image, draws)
    difference = (out.int() - reference(image).int()).abs().max()
    assert difference <= 2  # torchvision truncates, and rounds its grey image to uint8


def test_fused_color_jitter_hue_is_small() -> None:
    image = torch.zeros((3, 4, 4), dtype=torch.uint8)
    image[0] = 200  # pure red
    out = FusedColorJitter(0, 0, 0, 0.02, p=1.0).apply(image, [0.5, 0.5, 0.5, 1.0])
    red, green, blue = out[:, 0, 0].tolist()
    assert red > 180 and green < 30 and blue < 30 and (green, blue) != (0, 0)


def test_distributed_train_sampler_and_whole_eval(local_store: LocalStore,
                                                  local_published: PublishedDataset,
                                                  tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler, SequentialSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        loaders = build_loaders(local_store, local_published, tmp_path / "cache",
                                image_size=SIZE, batch_size=4, workers=0, distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(loaders.train.sampler, DistributedSampler)
    assert isinstance(loaders.valid.sampler, SequentialSampler)
    assert sum(len(t) for _, t in loaders.train) == 8
