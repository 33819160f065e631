"""flowerml.data.cache: a synced split decoded once into a uint8 memmap, reused and pickled by path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowerml.core.errors import DataError
from flowerml.data import cache
from flowerml.data.cache import build_decoded_split
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing, default_preprocessing
from flowerml.data.sync import sync_split
from flowerml.io.storage_local import LocalStore

# The synthetic source is 48 px: a 32 px crop comes from a round(32 * 256 / 224) = 37 px cache.
RESOLUTION = 37


def test_decoded_split_is_built_once(local_store: LocalStore, local_published: PublishedDataset,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    first = build_decoded_split(root, local_published, "train", RESOLUTION, workers=2)
    entries = local_published.split_files("train")
    assert first.decoded == 8 and len(first) == 8
    assert first.images.shape == (8, RESOLUTION, RESOLUTION, 3)
    assert first.images.dtype == np.uint8
    assert first.labels.dtype == np.int64
    assert first.labels.tolist() == [e.label - 1 for e in entries]
    expected = cache.decode_square(root / entries[4].key, RESOLUTION)
    assert np.array_equal(first.images[4], expected)
    mtime = first.path.stat().st_mtime_ns

    monkeypatch.setattr(cache, "decode_square", lambda *args: pytest.fail("decoded again"))
    second = build_decoded_split(root, local_published, "train", RESOLUTION)
    assert second.decoded == 0 and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.images, first.images)


def test_decode_square_crops_the_centre(tmp_path: Path) -> None:
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)
    pixels[:, 20:80] = 255  # a white centre square on a black wide image
    Image.fromarray(pixels).save(tmp_path / "wide.jpg", quality=95)
    square = cache.decode_square(tmp_path / "wide.jpg", 30)
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


def test_each_preprocessing_has_its_own_cache(local_store: LocalStore,
                                              local_published: PublishedDataset,
                                              tmp_path: Path) -> None:
    """A model's resize, crop and filter name its cache: a 232/224-like one and today's
    256/224-like one (and a bicubic one) never read each other's pixels."""
    root = sync_split(local_store, local_published, ["valid"], tmp_path / "cache")
    squares = [default_preprocessing(32), Preprocessing(34, 32),
               Preprocessing(37, 32, interpolation="bicubic"), Preprocessing(37, 30)]
    built = [build_decoded_split(root, local_published, "valid", square) for square in squares]
    assert len({decoded.path for decoded in built}) == len(squares)
    assert all(decoded.decoded == 8 for decoded in built)
    assert built[1].path.name.startswith("valid-34px-crop32-")
    assert "-bicubic-" in built[2].path.name
    first = root / local_published.split_files("valid")[0].key
    for square, decoded in zip(squares, built, strict=True):
        again = build_decoded_split(root, local_published, "valid", square)
        assert again.decoded == 0 and again.path == decoded.path
        assert np.array_equal(again.images[0], cache.decode_square(first, square))
    assert not np.array_equal(built[0].images, built[2].images)  # the filter alone differs


def test_decoding_needs_a_synced_split(local_published: PublishedDataset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not in the local cache"):
        build_decoded_split(tmp_path, local_published, "test", RESOLUTION)




@pytest.mark.parametrize("square", [RESOLUTION, Preprocessing(40, 32, interpolation="bicubic")])
def test_many_workers_decode_in_processes_into_the_same_cache(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, square: int | Preprocessing) -> None:
    """From PROCESS_MIN_WORKERS workers on, spawned processes fill the memory-mapped file: the
    cache holds exactly what decoding each image gives, in manifest order."""
    monkeypatch.setattr(cache, "PROCESS_MIN_WORKERS", 2)
    monkeypatch.setattr(cache, "PROCESS_MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(cache, "PROCESS_CHUNK", 3)  # 8 images: chunks of 3, 3 and 2
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    assert cache.use_processes(2, 8)
    decoded = build_decoded_split(root, local_published, "train", square, workers=2)
    entries = local_published.split_files("train")
    assert decoded.decoded == 8
    for index, entry in enumerate(entries):
        assert np.array_equal(decoded.images[index],
                              cache.decode_square(root / entry.key, square))


def test_a_bad_image_fails_the_processes_and_leaves_no_cache(
        local_store: LocalStore, local_published: PublishedDataset, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "PROCESS_MIN_WORKERS", 2)
    monkeypatch.setattr(cache, "PROCESS_MIN_IMAGES_PER_WORKER", 1)
    root = sync_split(local_store, local_published, ["train"], tmp_path / "cache")
    broken = root / local_published.split_files("train")[5].key
    broken.write_bytes(broken.read_bytes()[:100])  # truncated after it was synced
    with pytest.raises(DataError, match=f"^{broken}: does not decode"):
        build_decoded_split(root, local_published, "train", RESOLUTION, workers=2)
    assert not list((root / "decoded").glob("*.npy")) and \
        not list((root / "decoded").glob("*.json"))
