"""The e2e benchmark's archive: a synthetic Flowers-102 archive in the official format and split
sizes, at a scale, drawn by flowerml's own flower generator on all cores and cached.

`--scale 1` is the real archive's size: 102 classes, 8,189 JPEGs with a long side of 500 px
(~40 KB each), the official split sizes 1,020 / 1,020 / 6,149 (every class in every split).
`--scale s` keeps the 102 classes and multiplies every split by s (at least one image per
class and split). The archive is drawn once per (scale, size, quality) and kept in the work
folder; its drawing is not timed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import cached_folder, progress_log

CLASSES = 102
OFFICIAL_SPLIT = {"train": 1020, "valid": 1020, "test": 6149}
JPEG_SIZE = 500
JPEG_QUALITY = 87  # ~40 KB per 500 px synthetic image, like the real archive

log = progress_log("bench-e2e")


def split_sizes(scale: float) -> dict[str, int]:
    """Images per split at `scale` (1: the official 1,020 / 1,020 / 6,149)."""
    return {split: max(CLASSES, round(count * scale)) for split, count in OFFICIAL_SPLIT.items()}


def _draw(job: tuple[int, int, int, int, int]) -> bytes:
    import numpy as np

    from flowerml.data.flower_drawing import draw_flower, encode_jpeg, image_dimensions

    image_id, label, size, quality, seed = job
    rng = np.random.default_rng([seed, 3, image_id])  # flowerml.data.synthetic's image stream
    width, height = image_dimensions(size, rng)
    return encode_jpeg(draw_flower(label, rng, width, height), quality)


def write_official_archive(folder: Path, sizes: dict[str, int], size: int, quality: int,
                           seed: int = 0) -> None:
    """102flowers.tgz, imagelabels.mat and setid.mat with exactly `sizes` images per split,
    classes spread evenly over each split, image ids shuffled across splits."""
    import multiprocessing

    import numpy as np

    from flowerml.data.flowers import image_name
    from flowerml.data.synthetic import SYNTHETIC_MARKER, mat_bytes, write_tgz

    rng = np.random.default_rng([seed, 2])
    labels_by_split = {split: (np.arange(count) % CLASSES) + 1 for split, count in sizes.items()}
    total = sum(sizes.values())
    ids = rng.permutation(total) + 1  # image id of the i-th entry of the concatenated splits
    labels = np.zeros(total, dtype=np.uint8)
    setid: dict[str, np.ndarray] = {}
    offset = 0
    for split, key in (("train", "trnid"), ("valid", "valid"), ("test", "tstid")):
        count = sizes[split]
        chosen = ids[offset:offset + count]
        labels[chosen - 1] = labels_by_split[split]
        setid[key] = np.sort(chosen).astype(np.uint16)[np.newaxis, :]
        offset += count
    jobs = [(image_id, int(labels[image_id - 1]), size, quality, seed)
            for image_id in range(1, total + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool, \
            open(folder / "102flowers.tgz", "wb") as handle:
        images = pool.imap(_draw, jobs, chunksize=16)
        write_tgz(handle, ((f"jpg/{image_name(i)}", data)
                           for i, data in zip(range(1, total + 1), images, strict=True)))
    marker = (f"synthetic Flowers-102 archive in the official split sizes {sizes} drawn by "
              f"bench/e2e.py with flowerml.data.synthetic's generator (image_size={size} "
              f"jpeg_quality={quality} seed={seed}); its images are not photographs")
    (folder / "imagelabels.mat").write_bytes(mat_bytes({"labels": labels[np.newaxis, :],
                                                        SYNTHETIC_MARKER: marker}))
    (folder / "setid.mat").write_bytes(mat_bytes(setid))


def prepare_archive(workdir: Path, scale: float, size: int, quality: int) -> tuple[Path, dict]:
    """The cached archive folder for these parameters, drawn on first use; (folder, facts)."""
    sizes = split_sizes(scale)
    counts = "-".join(str(sizes[split]) for split in ("train", "valid", "test"))
    target = workdir / f"archive-{counts}-s{size}-q{quality}"

    def draw(folder: Path) -> dict:
        log(f"drawing {sum(sizes.values())} images ({size} px) into {target} (untimed)")
        started = time.perf_counter()
        write_official_archive(folder, sizes, size, quality)
        return {"splits": sizes, "images": sum(sizes.values()), "jpeg_side": size,
                "jpeg_quality": quality,
                "archive_mb": round((folder / "102flowers.tgz").stat().st_size / 2**20, 1),
                "draw_seconds": round(time.perf_counter() - started, 1)}

    facts, cached = cached_folder(target, draw)
    if cached:
        log(f"reusing the archive in {target}")
    return target, {**facts, "archive_cached": cached}
