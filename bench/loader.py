"""Benchmark: flowerml's training input pipeline against the original tutorial's, per CPU core.

What it measures. Training-input images per second (decoded, augmented, batched: what the
model would consume) over one epoch of the same train split, in the same run:

- tutorial: torchvision `ImageFolder` over the split's folder tree, the notebook's train
  transform (RandomRotation(45) on the full image, CenterCrop(224), flips, ColorJitter,
  RandomGrayscale, ToTensor, Normalize) and `DataLoader(batch_size=48, shuffle=True)` with no
  workers: every epoch decodes every full-size JPEG again.
- flowerml: `flowerml.data.loaders.build_loaders(preset="standard", image_size=224, batch_size=48)`:
  the split decoded once into a uint8 cache at 256 px, then per image a random resized crop,
  a flip and a colour jitter on uint8 tensors (flowerml's hand-written `ChannelsLastResizedCrop`
  and `FusedColorJitter`). Its batches are uint8: the float conversion
  and normalisation happen on the GPU (`prepare_batch`), so they are not in its figure, as
  the tutorial's CPU-side ToTensor + Normalize are in the tutorial's. Timed after the cache
  is built; the one-time sync and decode are reported separately. Two runs: `workers=0` (one
  process, the fair per-core figure) and `workers=<cpu count>`, whose per-core figure divides
  by the number of worker processes:
  its first epoch (worker start-up included) and the mean of the next three. With 1,020
  images an epoch is only 22 batches, so many workers spend part of each epoch filling and
  draining the pipeline; that, not the per-image cost, is why its per-core figure is lower.
- stock: the same cache and DataLoader (`workers=0`) with stock torchvision v2 ops in place of
  the hand-written ones: `RandomResizedCrop(224, scale=(0.25, 1), antialias=True)`,
  `RandomHorizontalFlip()`, `RandomApply([ColorJitter(0.2, 0.2, 0.2, hue=0)], p=0.8)` (no hue:
  v2's hue jitter alone costs more than the whole pipeline). It answers whether the stock ops
  keep the 5x target (`--no-stock` skips it).

The images. By default 1,020 train images (the real train split's size) drawn by
`flowerml.data.synthetic` at the real archive's scale (longest side 500 px, JPEG quality 87, ~40 KB),
published with `flowerml.data.ingest` into a LocalStore in the work directory; both pipelines read
the very same files (the synced split is an ImageFolder tree, byte-identical to the archive).
The synthetic split gives a quarter of each class to train, so 4x the train images are
generated; the archive is cached in the work directory between runs.

Both single-process runs use one torch thread, so "per core" means one core. The target:
flowerml's workers=0 images/s at least 5x the tutorial's.

Prints exactly one JSON object on stdout; progress goes to stderr.

    python bench/loader.py                         # 1,020 images of 500 px
    python bench/loader.py --images 204            # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import MB, machine_facts, progress_log, publish_archive, synthetic_archive

TARGET_PER_CORE = 5.0
CLASSES = 102
TRAIN_SHARE = 4  # flowerml.data.synthetic gives round(per_class * 0.25) of each class to train
STEADY_EPOCHS = 3

log = progress_log("bench-loader")


# --------------------------------------------------------------------------------------------
# Setup: the archive (cached), published to a LocalStore, the train split synced and decoded


def prepare_archive(workdir: Path, images: int, size: int, quality: int) -> tuple[Path, float]:
    """The cached archive folder with about `images` train images; (folder, generate seconds)."""
    classes = min(CLASSES, images)
    per_class = TRAIN_SHARE * math.ceil(images / classes)
    source, facts = synthetic_archive(workdir, classes, per_class, size, quality)
    return source, facts["generate_seconds"]


def image_stats(files: list[Path]) -> dict:
    from PIL import Image

    sizes = []
    for path in files:
        with Image.open(path) as image:  # header only: no decode
            sizes.append(image.size)
    count = len(files)
    return {"count": count,
            "mean_width": round(sum(w for w, _ in sizes) / count),
            "mean_height": round(sum(h for _, h in sizes) / count),
            "mean_kb": round(sum(f.stat().st_size for f in files) / count / 1024, 1)}


# --------------------------------------------------------------------------------------------
# Timing


def time_epoch(loader) -> tuple[float, int]:
    """(seconds, images) of one pass over `loader`."""
    images = 0
    start = time.perf_counter()
    for batch, _targets in loader:
        images += len(batch)
    return time.perf_counter() - start, images


def warm_up(loader, batches: int = 2) -> None:
    """A few batches first, so one-off costs (first calls, lazy imports) are not timed."""
    for index, _batch in enumerate(loader):
        if index + 1 >= batches:
            break


def figures(seconds: float, images: int, cores: int) -> dict:
    rate = images / seconds
    return {"seconds": round(seconds, 3), "images": images, "images_per_s": round(rate, 1),
            "cores": cores, "images_per_s_per_core": round(rate / cores, 1)}


def run_tutorial(train_dir: Path, batch_size: int) -> dict:
    """The notebook: ImageFolder + its PIL train transform + DataLoader without workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from flowerml.data.transforms import build_transforms

    dataset = datasets.ImageFolder(str(train_dir), transform=build_transforms(
        "tutorial", 224, train=True))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    warm_up(loader)
    log(f"tutorial: one epoch of {len(dataset)} images ...")
    seconds, images = time_epoch(loader)
    return figures(seconds, images, 1)


def run_flowerml(store, published, cache: Path, batch_size: int, workers: int) -> dict:
    from flowerml.data.loaders import build_loaders

    start = time.perf_counter()
    loaders = build_loaders(store, published, cache, preset="standard", image_size=224,
                            batch_size=batch_size, workers=workers, splits=("train",),
                            pin_memory=False)
    setup = time.perf_counter() - start  # sync check + opening the cache: both already there
    if workers == 0:
        warm_up(loaders.train)
    log(f"flowerml workers={workers}: one epoch ...")
    seconds, images = time_epoch(loaders.train)
    result = {**figures(seconds, images, max(1, workers)), "workers": workers,
              "warm_setup_seconds": round(setup, 3)}
    if workers > 0:
        # The first epoch above includes starting the worker processes; later ones reuse them
        # (persistent workers), so they show the steady rate, epoch boundaries included.
        seconds = images = 0
        for _ in range(STEADY_EPOCHS):
            epoch_seconds, epoch_images = time_epoch(loaders.train)
            seconds, images = seconds + epoch_seconds, images + epoch_images
        result["steady_epochs"] = {**figures(seconds, images, workers), "epochs": STEADY_EPOCHS}
        result["first_epoch_includes_worker_start"] = True
    del loaders
    return result


def stock_transform(image_size: int):
    """The `standard` train augmentation from stock torchvision v2 ops (hue jitter left out)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, hue=0)], p=0.8)])


def run_stock(decoded, batch_size: int) -> dict:
    """flowerml's cache and loader with stock v2 ops in place of the hand-written ones."""
    from flowerml.data.loaders import CachedImageDataset, make_loader

    dataset = CachedImageDataset(decoded, stock_transform(224))
    loader = make_loader(dataset, batch_size=batch_size, workers=0, pin_memory=False,
                         persistent=False, shuffle=True)
    warm_up(loader)
    log("stock v2 ops workers=0: one epoch ...")
    seconds, images = time_epoch(loader)
    return {**figures(seconds, images, 1), "workers": 0}


# --------------------------------------------------------------------------------------------
# Main


def machine() -> dict:
    import torch

    return {**machine_facts(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    import torch

    from flowerml.data.cache import build_decoded_split
    from flowerml.data.preprocessing import default_preprocessing
    from flowerml.data.sync import sync_split
    from flowerml.io.storage_local import LocalStore

    workdir = Path(args.workdir)
    source, generate_seconds = prepare_archive(workdir, args.images, args.image_size,
                                               args.jpeg_quality)
    store = LocalStore(scratch / "store")
    log("publishing with flowerml ingest ...")
    published = publish_archive(source, store, scratch / "ingest-cache")
    cache = scratch / "cache"

    start = time.perf_counter()
    root = sync_split(store, published, ["train"], cache)
    sync_seconds = time.perf_counter() - start
    log(f"synced the train split in {sync_seconds:.2f} s; decoding it once ...")
    start = time.perf_counter()
    decoded = build_decoded_split(root, published, "train", default_preprocessing(224),
                                  workers=os.cpu_count())
    decode_seconds = time.perf_counter() - start
    files = [root / entry.key for entry in published.split_files("train")]

    torch.set_num_threads(1)  # per core means one core, for both single-process runs
    tutorial = run_tutorial(root / "train", args.batch_size)
    single = run_flowerml(store, published, cache, args.batch_size, 0)
    multi = run_flowerml(store, published, cache, args.batch_size, args.workers)
    stock = None if args.no_stock else run_stock(decoded, args.batch_size)

    ratio = single["images_per_s_per_core"] / tutorial["images_per_s_per_core"]
    ratio_multi = multi["images_per_s_per_core"] / tutorial["images_per_s_per_core"]
    ratio_steady = (multi["steady_epochs"]["images_per_s_per_core"]
                    / tutorial["images_per_s_per_core"])
    report = {
        "benchmark": "training-input images/s per CPU core: flowerml standard vs tutorial",
        "train_images": tutorial["images"],
        "jpeg": {**image_stats(files), "longest_side": args.image_size,
                 "quality": args.jpeg_quality},
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "torch_threads_single_process": 1,
        "tutorial": tutorial,
        "flowerml_workers_0": single,
        "flowerml_workers_n": multi,
        "cache_build": {"sync_seconds": round(sync_seconds, 2),
                        "decode_seconds": round(decode_seconds, 2),
                        "decoded_images": decoded.decoded,
                        "resolution": decoded.resolution,
                        "cache_mb": round(decoded.path.stat().st_size / MB, 1)},
        "ratio_per_core": round(ratio, 2),
        "ratio_per_core_workers_n": round(ratio_multi, 2),
        "ratio_per_core_workers_n_steady": round(ratio_steady, 2),
        "ratio_images_per_s_workers_n": round(multi["images_per_s"] / tutorial["images_per_s"],
                                              2),
        "target": {"per_core_ratio_at_least": TARGET_PER_CORE,
                   "basis": "flowerml_workers_0 vs tutorial, images/s on one core",
                   "met": ratio >= TARGET_PER_CORE,
                   "met_workers_n_first_epoch": ratio_multi >= TARGET_PER_CORE,
                   "met_workers_n_steady": ratio_steady >= TARGET_PER_CORE},
        "generate_seconds": generate_seconds,
        "machine": machine(),
    }
    if stock is not None:
        report["stock_v2_workers_0"] = stock
        report["ratio_per_core_stock"] = round(
            stock["images_per_s_per_core"] / tutorial["images_per_s_per_core"], 2)
        report["target"]["met_stock"] = report["ratio_per_core_stock"] >= TARGET_PER_CORE
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1020,
                        help="train images (rounded up to whole classes of 102)")
    parser.add_argument("--image-size", type=int, default=500,
                        help="longest side of the synthetic JPEGs in pixels")
    parser.add_argument("--jpeg-quality", type=int, default=87,
                        help="quality of the synthetic JPEGs (87: ~40 KB at 500 px)")
    parser.add_argument("--batch-size", type=int, default=48, help="the tutorial's 48")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers of the multi-process flowerml run")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir())
                                                 / "flowerml-bench-loader"),
                        help="where the archive is cached and the run writes its files")
    parser.add_argument("--keep", action="store_true", help="keep this run's store and cache")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip the stock torchvision v2 variant")
    args = parser.parse_args(argv)
    if args.images < 1 or args.workers < 1 or args.batch_size < 1:
        parser.error("--images, --workers and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = str(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        report = measure(args, scratch)
    finally:
        if args.keep:
            log(f"kept the run's files in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
