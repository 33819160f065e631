"""A run's TensorBoard event files: `runs/<run_id>/tensorboard/`, beside its metrics.jsonl.

Training logs each epoch's metrics.jsonl row as scalars at step = epoch (rank 0 only, once the
epoch's checkpoint is on the store, when the epoch is announced); evaluation adds its confusion
matrix as an image under `tensorboard/eval/<split>/` (a TensorBoard run of its own, replaced by
the next evaluation of that split as the report beside it is), at step = the evaluated weights'
epoch. Event files are written into a local temporary folder and uploaded through the store
after every write, so a local store and S3 get the same keys and a long run's curves can be
watched while it trains.

A resumed (or extended) run adds an event file of its own that opens with TensorBoard's purge
marker at the epoch it resumes from, and logs that epoch again from the checkpoint's history:
readers drop the older files' events from that step on, so a run killed between its checkpoint
and the upload shows neither a gap nor a duplicate step. A run trained before these files
existed gets its whole history when it resumes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerml.io.storage import Store
from flowerml.training.runs import BEST, RunFiles

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"
CONFUSION_MATRIX_TAG = "confusion_matrix"
EVENT_FILE_MARK = "tfevents"

# metrics.jsonl's names, grouped so that TensorBoard draws train and valid side by side;
# any other number in a row (a distillation probe's figures) keeps its own name.
SCALAR_TAGS = {"train_loss": "loss/train", "valid_loss": "loss/valid",
               "train_top1": "top1/train", "valid_top1": "top1/valid",
               "valid_top5": "top5/valid", "lr": "learning_rate"}
# An epoch event's fields that are not the epoch's metrics.jsonl row.
NOT_IN_ROW = {"event", "epoch", "epochs", "best_valid_top1"}

EventFn = Callable[[dict[str, Any]], None]


def scalar_tag(name: str) -> str:
    return SCALAR_TAGS.get(name, name)


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl row (or epoch event), by tag."""
    return {scalar_tag(name): float(value) for name, value in row.items()
            if name not in NOT_IN_ROW and isinstance(value, int | float)
            and not isinstance(value, bool)}


def has_event_files(store: Store, prefix: str) -> bool:
    """Whether the folder `prefix` itself (not a TensorBoard run below it, like eval/) holds
    event files."""
    return any(EVENT_FILE_MARK in info.key[len(prefix):] and "/" not in info.key[len(prefix):]
               for info in store.list(prefix))


class LocalEvents:
    """A SummaryWriter over a fresh local folder whose one event file is uploaded to `prefix`
    on the store, created on the first write (nothing is uploaded for a process that logs
    nothing).

    Its key is named for the nanosecond it was opened: TensorBoard reads a folder's event
    files in name order, and SummaryWriter's own names (whole seconds, then host, pid and an
    unpadded counter) can sort two files of the same second the wrong way round."""

    def __init__(self, store: Store, prefix: str, purge_step: int | None = None) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/"
        self.purge_step = purge_step
        self.folder: Path | None = None
        self.writer: SummaryWriter | None = None
        self.key: str | None = None

    def open(self) -> SummaryWriter:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.folder = Path(tempfile.mkdtemp(prefix="flowerml-tensorboard-"))
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purge_step)
            self.key = (f"{self.prefix}events.out.{EVENT_FILE_MARK}.{time.time_ns():020d}."
                        f"{os.getpid()}")
        return self.writer

    def upload(self) -> str | None:
        """Flush, then put the event file on the store; returns its key (None: nothing was
        written)."""
        if self.writer is None or self.folder is None or self.key is None:
            return None
        self.writer.flush()
        [path] = self.folder.iterdir()
        self.store.put_file(self.key, path)
        return self.key

    def close(self) -> str | None:
        """Upload what was written and remove the local folder; returns the key uploaded."""
        try:
            if self.writer is not None:
                self.writer.close()
            return self.upload()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.writer = self.folder = None


class TrainingBoard:
    """The scalars of one training process: `log_epoch` per finished epoch, after `replay`
    (a resumed run's history, logged again once its purge marker is written)."""

    def __init__(self, run: RunFiles, history: Sequence[dict[str, Any]]) -> None:
        prefix = run.key(f"{TENSORBOARD_DIR}/")
        # Only the resumed epoch is logged again, unless the run has no event files yet.
        self.replay = list(history if not has_event_files(run.store, prefix) else history[-1:])
        self.events = LocalEvents(run.store, prefix,
                                  purge_step=self.replay[0]["epoch"] if self.replay else None)

    def log_epoch(self, row: dict[str, Any]) -> None:
        writer = self.events.open()
        for earlier in self.replay:
            self._add(writer, earlier)
        self.replay = []
        self._add(writer, row)
        self.events.upload()

    @staticmethod
    def _add(writer: SummaryWriter, row: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(row).items():
            writer.add_scalar(tag, value, global_step=int(row["epoch"]))

    def observe(self, event: dict[str, Any]) -> None:
        """An `EpochLoop` event: an "epoch" event is logged, every other one ignored."""
        if event.get("event") == "epoch":
            self.log_epoch(event)

    def close(self) -> None:
        self.events.close()


@contextlib.contextmanager
def tensorboard_events(run: RunFiles, history: Sequence[dict[str, Any]], emit: EventFn,
                       enabled: bool = True) -> Iterator[EventFn]:
    """`emit`, also logging each epoch event to the run's TensorBoard files (rank 0 passes
    `enabled`; the other ranks get `emit` unchanged). `history`: the rows the run resumes
    with (empty for a fresh run)."""
    if not enabled:
        yield emit
        return
    board = TrainingBoard(run, history)

    def emit_and_log(event: dict[str, Any]) -> None:
        board.observe(event)
        emit(event)

    try:
        yield emit_and_log
    finally:
        board.close()


def evaluation_prefix(run: RunFiles, split: str) -> str:
    return run.key(f"{TENSORBOARD_DIR}/eval/{split}/")


def log_confusion_matrix(run: RunFiles, split: str, png: Path) -> str | None:
    """The confusion matrix plot `png` (the report's) as image `confusion_matrix` of
    TensorBoard run `eval/<split>`, at the evaluated weights' epoch; the previous evaluation's
    event files of that split are deleted once the new one is stored. Returns its key."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    prefix = evaluation_prefix(run, split)
    previous = [info.key for info in run.store.list(prefix)]
    events = LocalEvents(run.store, prefix)
    epoch = run.read_pointer(BEST.pointer).get("epoch") or 0
    events.open().add_image(CONFUSION_MATRIX_TAG, pixels, global_step=int(epoch),
                            dataformats="HWC")
    written = events.close()
    for key in previous:
        if key != written:
            run.store.delete(key)
    return written


def tensorboard_logdir(run: RunFiles, keys: Sequence[str]) -> str | None:
    """Where `tensorboard --logdir` should point for this run (a path, or an s3:// URI), or
    None when `keys` (the run's) hold no event files."""
    prefix = run.key(f"{TENSORBOARD_DIR}/")
    if not any(key.startswith(prefix) and EVENT_FILE_MARK in key for key in keys):
        return None
    return run.store.location(prefix.rstrip("/"))
