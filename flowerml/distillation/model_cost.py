"""What a model costs: parameters, multiply-accumulates per image, weights file size and CPU
images/s, as a student's card records them for itself and its teacher (`compare_profiles`)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from flowerml.evaluation.inference import TrainedModel
from flowerml.models.backbones import build_model


def count_macs(arch: str, num_classes: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers, as
    FLOPs / 2), counted on a parameter-less copy on the meta device: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(arch, num_classes).eval()
        images = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops() // 2)


@torch.inference_mode()
def cpu_images_per_second(model: nn.Module, image_size: int, *, batch_size: int = 8,
                          seconds: float = 1.0) -> float:
    """Forward passes per second on this machine's CPU (a copy of `model`, eval mode, fp32,
    torch's default threads), after one warm-up batch, for at least `seconds` and 2 batches."""
    copy_ = copy.deepcopy(model).cpu().eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    copy_(images)
    done, started = 0, time.perf_counter()
    while True:
        copy_(images)
        done += batch_size
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2 * batch_size:
            return round(done / elapsed, 2)


def model_profile(trained: TrainedModel, file_bytes: int, *, seconds: float = 1.0
                  ) -> dict[str, Any]:
    """Parameters, MACs per image, weights file size and CPU images/s of a model, at its own
    image size."""
    return {"arch": trained.arch, "image_size": trained.image_size,
            "params": sum(p.numel() for p in trained.model.parameters()),
            "macs": count_macs(trained.arch, len(trained.class_names), trained.image_size),
            "file_bytes": int(file_bytes),
            "cpu_images_per_second": cpu_images_per_second(trained.model, trained.image_size,
                                                           seconds=seconds),
            "cpu_threads": torch.get_num_threads()}


def compare_profiles(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Both profiles, measured in one process, and what the student saves."""
    return {"student": student, "teacher": teacher,
            "macs_ratio": round(teacher["macs"] / max(1, student["macs"]), 2),
            "params_ratio": round(teacher["params"] / max(1, student["params"]), 2),
            "cpu_speedup": round(student["cpu_images_per_second"]
                                 / max(teacher["cpu_images_per_second"], 1e-9), 2)}
