"""Mixed precision: which autocast a device gets and whether its steps need a gradient scaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPUs that have it, fp16 elsewhere on CUDA, fp32 on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
