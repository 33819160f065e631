"""Mixed precision: which autocast a device gets and whether its steps need a gradient scaler.

On the CPU, bf16 autocast pays only where the cores compute bf16 natively (AVX512-BF16, AMX:
oneDNN's bf16 kernels); elsewhere PyTorch emulates it, slower than fp32, so those CPUs train
in fp32 as before."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPUs that have it, fp16 elsewhere on CUDA; bf16 on CPUs that compute
    it natively, fp32 on other CPUs."""
    if not enabled:
        return contextlib.nullcontext
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    if device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). torch has no public
    query for it (`torch.backends.cpu.get_cpu_capability()` names the vector ISA, not bf16):
    its private check is read defensively, so a torch without it trains in fp32 as before."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
