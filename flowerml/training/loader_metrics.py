"""A model's metrics over every batch of a loader: each epoch's validation, and `flowerml
evaluate`'s pass over a split."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from flowerml.data.preprocessing import Preprocessing
from flowerml.data.transforms import normalising, prepare_batch
from flowerml.models.precision import autocast_for
from flowerml.training.metrics import Metrics, MetricsAccumulator


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                    class_names: tuple[str, ...], *, amp: bool = False,
                    channels_last: bool = False,
                    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                    normalisation: Preprocessing | None = None) -> Metrics:
    """Metrics of `model` over every batch of `loader`; `observe(inputs, logits)` sees each
    batch too (a `ValidationProbe`). uint8 batches are normalised with `normalisation`'s mean
    and std (default: ImageNet's)."""
    model.eval()
    accumulator = MetricsAccumulator(len(class_names))
    autocast = autocast_for(device, amp)
    for batch, targets in loader:
        inputs = prepare_batch(batch, device, channels_last=channels_last,
                               **normalising(normalisation))
        with autocast():
            logits = model(inputs)
        if observe is not None:
            observe(inputs, logits)
        accumulator.update(logits.float(), targets.to(device))
    return accumulator.result(class_names)

