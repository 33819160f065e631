"""flowerml.data.archive_survey: the decode check at 1/8 scale refuses what a full decode refuses,
and an ingest decompresses the archive once (the survey is reused from the cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.data import archive_survey
from flowerml.data.archive_survey import check_jpeg
from flowerml.data.ingest import ingest
from flowerml.data.source_files import FetchOptions
from flowerml.io.storage_local import LocalStore


def run_ingest(source: Path, store: LocalStore, cache: Path):
    return ingest(str(source), store, "flowers102", cache, FetchOptions())


def test_archive_is_decompressed_once_per_ingest(local_store: LocalStore, synthetic_source: Path,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[Path] = []
    original = archive_survey.iter_archive_images

    def counting(path: Path, **kwargs):
        passes.append(path)
        return original(path, **kwargs)

    monkeypatch.setattr(archive_survey, "iter_archive_images", counting)
    result = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    assert result.uploaded == 24 and len(passes) == 1
    again = run_ingest(synthetic_source, local_store, tmp_path / "cache")
    assert again.skipped == 24 and len(passes) == 1  # the survey is reused from the cache


def full_decode_fails(data: bytes) -> bool:
    """Whether Pillow refuses `data` when decoding it at full size, as a loader would."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


def test_reduced_scale_decode_check_catches_corrupt_and_truncated_jpegs() -> None:
    """The survey decodes at 1/8 scale (every entropy-coded byte is still read): it refuses the
    damaged JPEGs the tests feed ingest (half an image, not a JPEG) and every truncation, and
    agrees with a full-size decode on each damaged copy, bit flips included."""
    import random

    import numpy as np

    from flowerml.data.flower_drawing import draw_flower, encode_jpeg, image_dimensions

    rng = np.random.default_rng(7)
    width, height = image_dimensions(500, rng)  # the real archive's size
    good = encode_jpeg(draw_flower(3, rng, width, height), 87)
    assert check_jpeg(good) is None
    truncated = [good[: len(good) * share // 100] for share in (5, 30, 50, 90, 99)]
    truncated += [good[:-cut] for cut in (1, 2, 10, 100)]
    for data in [*truncated, b"not a jpeg at all", good[:600] + bytes(len(good) - 600)]:
        problem = check_jpeg(data)
        assert problem is not None and problem.startswith(("does not decode", "not a JPEG"))
        assert full_decode_fails(data)
    flips = random.Random(0)
    for _ in range(20):
        damaged = bytearray(good)
        damaged[flips.randrange(700, len(good) - 2)] ^= 0xFF
        assert (check_jpeg(bytes(damaged)) is not None) == full_decode_fails(
            bytes(damaged))
