"""The linear probe: the backbone's features computed once, then many cheap epochs of the head
alone over them.

The features of each split are cached on local disk under a key of what determines them (arch,
weights, image size, preprocessing when not today's default, manifest, split), so a new run with the same backbone reuses them. As a
`Trainee` the probe trains `model.head`, keeps each best epoch's head in memory (and in the
checkpoint: `TrainState.best_head`), and writes the whole model with the best head once, at
the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from flowerml.core.files import write_atomically
from flowerml.core.recipes import TrainConfig
from flowerml.data.loaders import build_loaders
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing, default_preprocessing
from flowerml.data.transforms import normalising, prepare_batch
from flowerml.io.storage import Store
from flowerml.models.backbones import FlowerModel
from flowerml.models.distributed import Placement
from flowerml.models.precision import autocast_for
from flowerml.training.checkpoints import TrainState
from flowerml.training.runs import RunFiles
from flowerml.training.seeding import EpochOrder, EpochSeeded
from flowerml.training.trainee import Trainee

LINEAR_PROBE = "linear-probe"


class LinearProbe(Trainee):
    """The head trained on cached backbone features (inputs are feature vectors: no
    channels_last)."""

    def __init__(self, model: FlowerModel) -> None:
        super().__init__(model, model.head, channels_last=False)

    def loaders(self, config: TrainConfig, store: Store, published: PublishedDataset,
                cache_dir: Path, placement: Placement, workers: int | None,
                preprocessing: Preprocessing | None = None) -> tuple[DataLoader, DataLoader]:
        return feature_loaders(self.model, config, store, published, cache_dir,
                               placement.device, workers, preprocessing)

    def keep_best(self, run: RunFiles, state: TrainState, epoch: int, top1: float) -> None:
        state.best_head = {k: v.detach().cpu().clone()
                           for k, v in self.model.head.state_dict().items()}

    def finish(self, run: RunFiles, state: TrainState) -> None:
        if state.best_head is not None:
            save_best_linear_probe(run, self.model, state)


def save_best_linear_probe(run: RunFiles, model: FlowerModel, state: TrainState) -> None:
    """The full model with the best head, written once at the end of a linear probe."""
    current = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.head.load_state_dict(state.best_head)
    run.save_weights(model.state_dict(), epoch=state.best_epoch, valid_top1=state.best_top1)
    model.head.load_state_dict(current)


def feature_cache_key(config: TrainConfig, published: PublishedDataset, split: str,
                      preprocessing: Preprocessing | None = None) -> str:
    identity = {"arch": config.arch, "weights": config.weights, "image_size": config.image_size,
                "manifest": published.manifest_sha256, "split": split,
                "seed": config.seed if config.weights == "none" else None}
    if preprocessing not in (None, default_preprocessing(config.image_size)):
        identity["preprocessing"] = preprocessing.to_json()  # today's keys stay as they were
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(model: FlowerModel, loader: DataLoader, device: torch.device,
                     amp: bool, preprocessing: Preprocessing | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    autocast = autocast_for(device, amp)
    features, labels = [], []
    for batch, targets in loader:
        inputs = prepare_batch(batch, device, **normalising(preprocessing))
        with autocast():
            features.append(model.features(inputs).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def cached_features(model: FlowerModel, loader: DataLoader, path: Path, device: torch.device,
                    amp: bool, preprocessing: Preprocessing | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of every image, computed once and kept on local disk."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["features"], saved["labels"]
    features, labels = compute_features(model, loader, device, amp, preprocessing)
    write_atomically(path, lambda temp: torch.save({"features": features, "labels": labels},
                                                   temp))
    return features, labels


def feature_loaders(model: FlowerModel, config: TrainConfig, store: Store,
                    published: PublishedDataset, cache_dir: Path, device: torch.device,
                    workers: int | None, preprocessing: Preprocessing | None = None
                    ) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached backbone features; the backbone sees each image once, ever."""
    paths = {split: cache_dir / "features" /
             f"{feature_cache_key(config, published, split, preprocessing)}.pt"
             for split in ("train", "valid")}
    loaders = None
    if not all(path.is_file() for path in paths.values()):
        loaders = build_loaders(store, published, cache_dir, preset="none",
                                image_size=config.image_size, batch_size=config.batch_size,
                                workers=workers, seed=config.seed, preprocessing=preprocessing)
    tensors = {split: cached_features(model, getattr(loaders, split, None), paths[split],
                                      device, config.amp, preprocessing) for split in paths}
    features = TensorDataset(*tensors["train"])
    train = DataLoader(EpochSeeded(features, config.seed), batch_size=config.batch_size,
                       sampler=EpochOrder(len(features), config.seed),
                       generator=torch.Generator().manual_seed(config.seed))
    valid = DataLoader(TensorDataset(*tensors["valid"]), batch_size=1024)
    return train, valid

