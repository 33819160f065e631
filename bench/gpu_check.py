"""GPU correctness check: flowerml's own fit/resume/evaluate/predict on CUDA, end to end.

The test suite runs on CPUs only; this runs the CUDA code paths (bf16 autocast, channels_last,
pinned loaders, checkpoint and resume, evaluation, prediction) on a small synthetic dataset,
and measures ResNet-152 training throughput at batch 64 and 256 on synthetic batches to show
how far batch size moves the launch-bound regime. Needs only torch, torchvision and flowerml's
own modules. Prints one JSON object.

    PYTHONPATH=. python bench/gpu_check.py [--device cpu]   # cpu: a quick local smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import DATASET, publish_synthetic

from flowerml.core.recipes import build_config
from flowerml.data.synthetic import SyntheticSpec
from flowerml.evaluation.inference import evaluate_run, load_trained_model
from flowerml.serving.prediction import predict_images
from flowerml.serving.runtimes import scorer_from_model
from flowerml.training.fit import fit
from flowerml.training.runs import RunFiles


def end_to_end(device: str, workdir: Path) -> dict:
    store, cache, _dataset = publish_synthetic(
        workdir, SyntheticSpec(classes=6, per_class=20, image_size=128))
    config = build_config("demo", epochs=3, image_size=64, batch_size=16)
    first = fit(config, store=store, dataset=DATASET, run_id="gpu", cache_dir=cache,
                device=device, workers=2)
    longer = build_config("demo", epochs=4, image_size=64, batch_size=16)
    fit(longer, store=store, dataset=DATASET, run_id="gpu-resume", cache_dir=cache,
        device=device, workers=2)
    state = RunFiles(store, "gpu-resume").load_checkpoint()
    # Re-running a run id restores its checkpoint onto the device: the resume path.
    resumed = fit(longer, store=store, dataset=DATASET, run_id="gpu-resume",
                  cache_dir=cache, device=device, workers=2)
    evaluation = evaluate_run(store, "gpu", cache_dir=cache, device=device, workers=2)
    trained = load_trained_model(store, "gpu", device)
    image = next(cache.rglob("test/*/*.jpg"))
    prediction = predict_images(scorer_from_model(trained), [image], top_k=3)[0]
    return {"fit": first.to_json(), "checkpoint_epoch": state["state"]["epoch"],
            "resumed_from_epoch": resumed.resumed_from_epoch,
            "evaluation": evaluation.metrics.summary(),
            "prediction": prediction["predictions"][0], "model_device": str(trained.device)}


def batch_scaling(device: torch.device) -> dict:
    from gpu import build_stepper, synthetic_batches, time_training

    results = {}
    for batch in (64, 256):
        config = build_config("default", arch="resnet152", weights="none", batch_size=batch)
        stepper, _ = build_stepper(config, 102, device)
        results[f"batch_{batch}"] = time_training(
            stepper, synthetic_batches(batch, 224, 102, device), device, warmup=5, steps=15,
            channels_last=True)
        del stepper
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__,
              "end_to_end": end_to_end(args.device, Path(tempfile.mkdtemp()))}
    if args.device == "cuda":
        result["resnet152_bf16_channels_last_synthetic"] = batch_scaling(torch.device("cuda"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
