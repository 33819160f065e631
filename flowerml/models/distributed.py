"""Where training runs: the device, and the DDP process group when launched by torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.distributed as dist

from flowerml.core.errors import UserError
from flowerml.core.recipes import Device

DEVICES: tuple[str, ...] = get_args(Device)  # declared once, in flowerml/core/recipes.py


@dataclass(frozen=True)
class Placement:
    """This process's device and its place among the training processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(name: str) -> torch.device:
    """The device `--device` names; `auto` prefers CUDA."""
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}: got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here "
                        "(torch.cuda.is_available() is False); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def start_placement(device_name: str) -> Placement:
    """Join torchrun's process group when launched by it (NCCL on GPUs, gloo on CPUs)."""
    device = select_device(device_name)
    if not dist.is_torchelastic_launched():
        return Placement(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return Placement(device, rank, world)


def stop_placement(placement: Placement) -> None:
    if placement.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(placement: Placement, value: bool) -> bool:
    """Rank 0's decision, on every rank (e.g. early stopping)."""
    if not placement.distributed:
        return value
    flag = torch.tensor([int(value)], device=placement.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier(placement: Placement) -> None:
    if placement.distributed:
        dist.barrier()
