"""GPU benchmark: ResNet-152 fine-tuning throughput with flowerml's real input pipeline.

Measures, in one run on one CUDA device, training images/s of flowerml's own training step
(`flowerml.training.optimization.Stepper`: optimiser, schedule, loss) fed by:
- synthetic in-memory uint8 batches already on the GPU (the ceiling the input can reach), for
  the tutorial's setup (fp32, Adam, batch 48) and flowerml's (bf16 autocast, channels_last,
  torch.compile, measured last and on synthetic batches only);
- the real pipeline: a synthetic archive in the official format, ingested into a local store,
  synced and decoded once into the uint8 cache, augmented by DataLoader workers, pinned,
  normalised on the GPU; and the tutorial's own pipeline (PIL transforms, no workers).
Reports images/s, the real pipeline as a fraction of synthetic (target >= 0.9), and achieved
FLOP/s (counted with torch's FlopCounterMode) as a fraction of the GPU's dense bf16 peak.
Needs only torch, torchvision and flowerml's own modules (no Prefect, no boto3). Prints one
JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python bench/gpu.py [--skip-compile] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import progress_log, publish_synthetic

from flowerml.core.recipes import build_config
from flowerml.data.loaders import build_loaders
from flowerml.data.synthetic import SyntheticSpec
from flowerml.data.transforms import prepare_batch
from flowerml.models.backbones import build_model, prepare_for_strategy
from flowerml.models.precision import autocast_for, needs_grad_scaler
from flowerml.training.optimization import Stepper, build_optimizer, build_scheduler
from flowerml.training.training_task import ClassificationTask

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}

log = progress_log("bench-gpu")


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def build_stepper(config, num_classes: int, device: torch.device) -> tuple[Stepper, torch.nn.Module]:
    model = build_model(config.arch, num_classes, seed=0)
    prepare_for_strategy(model, config.strategy, config.freeze_stages)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    trained = torch.compile(model) if config.compile else model
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, config.amp) else None
    stepper = Stepper(trained, optimizer, build_scheduler(optimizer, config, 10_000),
                      ClassificationTask(config.label_smoothing),
                      autocast_for(device, config.amp), scaler)
    return stepper, model


def synthetic_batches(batch: int, size: int, classes: int, device: torch.device) -> Iterator:
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    while True:
        yield images, labels


def loader_batches(loader) -> Iterator:
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(stepper: Stepper, batches: Iterator, device: torch.device, *, warmup: int,
                  steps: int, channels_last: bool) -> dict:
    """images/s over `steps` optimisation steps after `warmup` untimed ones."""
    stepper.model.train()
    images = 0
    started = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            sync(device)
            started = time.perf_counter()
        inputs, targets = next(batches)
        inputs = prepare_batch(inputs, device, channels_last=channels_last)
        stepper.step(inputs, targets.to(device, non_blocking=True))
        if index >= warmup:
            images += len(targets)
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": round(images / seconds, 1), "seconds": round(seconds, 3),
            "steps": steps, "batch": images // steps}


def training_flops_per_image(model: torch.nn.Module, config, size: int, classes: int,
                             device: torch.device) -> float:
    """fwd + bwd FLOPs of one image, counted by torch (matmul/conv FLOPs; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = torch.randn(2, 3, size, size, device=device)
    targets = torch.randint(0, classes, (2,), device=device)
    with FlopCounterMode(display=False) as counter, autocast_for(device, config.amp)():
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    size, classes = args.image_size, 102
    workdir = Path(tempfile.mkdtemp(prefix="flowerml-gpu-bench-"))
    spec = SyntheticSpec(classes=classes, per_class=args.per_class, image_size=args.jpeg_size,
                         seed=0, jpeg_quality=87)
    started = time.perf_counter()
    store, cache, published = publish_synthetic(workdir, spec)
    setup_s = time.perf_counter() - started
    log(f"published {spec.num_images} images in {setup_s:.1f} s")
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else "cpu", "torch": torch.__version__, "arch": args.arch,
                     "image_size": size, "train_images": len(published.split_files("train")),
                     "setup_seconds": round(setup_s, 1), "runs": {}}
    common = {"arch": args.arch, "weights": "none", "image_size": size}
    setups = {
        "tutorial_fp32": build_config("tutorial", **common),
        "amp_bf16": build_config("default", **common, batch_size=args.batch,
                                 channels_last=False),
        "amp_bf16_channels_last": build_config("default", **common, batch_size=args.batch),
    }
    if not args.skip_compile:
        setups["amp_bf16_channels_last_compile"] = build_config(
            "default", **common, batch_size=args.batch, compile=True)
    amp_ok = device.type == "cuda"
    for name, config in setups.items():
        if not amp_ok and config.amp:
            config = build_config("default", **{**common, "amp": False})
        stepper, model = build_stepper(config, classes, device)
        started = time.perf_counter()
        try:
            run_result = time_training(stepper, synthetic_batches(config.batch_size, size,
                                                                  classes, device), device,
                                       warmup=args.warmup, steps=args.steps,
                                       channels_last=config.channels_last)
        except Exception as error:  # torch.compile can fail on a toolchain; keep the rest
            results["runs"][f"synthetic_{name}"] = {"error": f"{type(error).__name__}: {error}"}
            log(f"synthetic {name} failed: {error}")
            continue
        run_result["wall_seconds_incl_warmup"] = round(time.perf_counter() - started, 1)
        results["runs"][f"synthetic_{name}"] = run_result
        log(f"synthetic {name}: {run_result}")
        if name == "amp_bf16_channels_last":
            loaders = build_loaders(store, published, cache, preset="standard",
                                    image_size=size, batch_size=config.batch_size,
                                    workers=args.workers, splits=("train",))
            real = time_training(stepper, loader_batches(loaders.train), device,
                                 warmup=args.warmup, steps=args.steps,
                                 channels_last=config.channels_last)
            results["runs"][f"real_{name}"] = real
            log(f"real {name}: {real}")
            del loaders
        if name == "tutorial_fp32":
            loaders = build_loaders(store, published, cache, preset="tutorial", image_size=size,
                                    batch_size=config.batch_size, workers=0,
                                    splits=("train",))
            real = time_training(stepper, loader_batches(loaders.train), device,
                                 warmup=2, steps=max(4, args.steps // 3),
                                 channels_last=False)
            results["runs"]["real_tutorial_fp32_workers0"] = real
            log(f"real tutorial: {real}")
        if name == "amp_bf16_channels_last":
            results["flops_per_image"] = training_flops_per_image(model, config, size, classes,
                                                                  device)
        del stepper, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if name == "amp_bf16_channels_last":
            summarise(results, device)
        save_partial(args.out, results)
    return results


def save_partial(path: str | None, results: dict) -> None:
    """Keep what was measured so far, in case a later (compile) stage runs out of time."""
    if path:
        Path(path).write_text(json.dumps(results, sort_keys=True))


def summarise(results: dict, device: torch.device) -> None:
    runs = results["runs"]
    real, synthetic = runs["real_amp_bf16_channels_last"], runs["synthetic_amp_bf16_channels_last"]
    results["real_over_synthetic"] = round(real["images_per_s"] / synthetic["images_per_s"], 3)
    results["speedup_vs_tutorial_fp32_synthetic"] = round(
        synthetic["images_per_s"] / runs["synthetic_tutorial_fp32"]["images_per_s"], 2)
    results["speedup_vs_tutorial_real_pipeline"] = round(
        real["images_per_s"] / runs["real_tutorial_fp32_workers0"]["images_per_s"], 2)
    achieved = results["flops_per_image"] * real["images_per_s"]
    peak = bf16_peak(device)
    results["achieved_tflops"] = round(achieved / 1e12, 1)
    results["bf16_peak_tflops"] = round(peak / 1e12, 1) if peak else None
    results["fraction_of_bf16_peak"] = round(achieved / peak, 3) if peak else None
    results["targets"] = {"real_at_least_90pct_of_synthetic": results["real_over_synthetic"] >= 0.9}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--jpeg-size", type=int, default=500, help="longest side of the JPEGs")
    parser.add_argument("--per-class", type=int, default=20, help="20 gives 5 train per class")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", help="also write the (partial) results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = parser.parse_args()
    if args.quick:
        args.device, args.arch, args.image_size, args.jpeg_size = "cpu", "resnet18", 64, 96
        args.per_class, args.batch, args.workers, args.warmup, args.steps = 4, 8, 2, 1, 2
        args.skip_compile = True
    return args


if __name__ == "__main__":
    print(json.dumps(run(parse()), sort_keys=True))
