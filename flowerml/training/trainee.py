"""What the training loop trains: the module its optimiser updates and its checkpoints hold, the
loaders that feed it, and where each best-on-valid epoch's weights go.

`WholeModel` (strategy finetune) trains the model on images, augmented, in an order and with
augmentations drawn from (seed, epoch) alone (`seeding.epoch_loader`); the linear probe
(`flowerml.training.linear_probe.LinearProbe`) trains the head alone on backbone features cached once.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from flowerml.core.recipes import TrainConfig
from flowerml.data.loaders import build_loaders
from flowerml.data.manifest import PublishedDataset
from flowerml.data.preprocessing import Preprocessing
from flowerml.io.storage import Store
from flowerml.models.backbones import FlowerModel
from flowerml.models.distributed import Placement
from flowerml.training.checkpoints import TrainState
from flowerml.training.runs import RunFiles
from flowerml.training.seeding import epoch_loader


class Trainee:
    """`model` is the whole model (what a run's weights hold); `module` is the part the
    optimiser trains, whose weights checkpoints hold; `channels_last`: how batches are laid
    out on the device."""

    def __init__(self, model: FlowerModel, module: nn.Module, channels_last: bool) -> None:
        self.model, self.module, self.channels_last = model, module, channels_last

    def loaders(self, config: TrainConfig, store: Store, published: PublishedDataset,
                cache_dir: Path, placement: Placement, workers: int | None,
                preprocessing: Preprocessing | None = None) -> tuple[DataLoader, DataLoader]:
        """(train, valid): train's sampler takes `set_epoch` before each epoch; images decoded
        at the model's `preprocessing` (see `flowerml.data.loaders`)."""
        raise NotImplementedError

    def keep_best(self, run: RunFiles, state: TrainState, epoch: int, top1: float) -> None:
        """Keep the weights of a new best epoch (on the main rank)."""
        raise NotImplementedError

    def finish(self, run: RunFiles, state: TrainState) -> None:
        """Anything left to write once the last epoch is done (on the main rank)."""


class WholeModel(Trainee):
    """The model trained on images; each best epoch's weights are written at once."""

    def __init__(self, model: FlowerModel, channels_last: bool) -> None:
        super().__init__(model, model, channels_last)

    def loaders(self, config: TrainConfig, store: Store, published: PublishedDataset,
                cache_dir: Path, placement: Placement, workers: int | None,
                preprocessing: Preprocessing | None = None) -> tuple[DataLoader, DataLoader]:
        loaders = build_loaders(store, published, cache_dir, preset=config.augment,
                                image_size=config.image_size, batch_size=config.batch_size,
                                workers=workers, seed=config.seed,
                                distributed=placement.distributed, preprocessing=preprocessing)
        return epoch_loader(loaders.train, config.seed), loaders.valid

    def keep_best(self, run: RunFiles, state: TrainState, epoch: int, top1: float) -> None:
        run.save_weights(self.model.state_dict(), epoch=epoch, valid_top1=top1)
