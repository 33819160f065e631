"""flowerml.models.precision: which autocast each device gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowerml.models import precision
from flowerml.models.precision import autocast_for, cpu_has_native_bf16, needs_grad_scaler

CPU = torch.device("cpu")


def matmul_dtype(autocast) -> torch.dtype:
    with autocast():
        return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype


def test_cpu_with_native_bf16_trains_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert matmul_dtype(autocast_for(CPU, True)) == torch.bfloat16
    assert matmul_dtype(autocast_for(CPU, False)) == torch.float32
    assert not needs_grad_scaler(CPU, True)


def test_cpu_without_native_bf16_stays_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # emulated bf16 is slower than fp32: such a CPU keeps training in fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert matmul_dtype(autocast_for(CPU, True)) == torch.float32


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_reports() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_a_torch_without_the_private_check_trains_in_fp32(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert cpu_has_native_bf16() is False
    assert matmul_dtype(autocast_for(CPU, True)) == torch.float32
