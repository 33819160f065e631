"""A run's TensorBoard event files, read back as TensorBoard reads them: each epoch's scalars at
its step, a resumed or extended run without duplicate or missing steps, the evaluation's
confusion matrix as an image, on a local store and on S3."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowerml.core.recipes import TrainConfig, build_config
from flowerml.evaluation.inference import evaluate_run
from flowerml.io.storage import Store
from flowerml.training.fit import fit
from flowerml.training.runs import BEST, RunFiles
from flowerml.training.tensorboard_log import (
    CONFUSION_MATRIX_TAG,
    SCALAR_TAGS,
    TrainingBoard,
    log_confusion_matrix,
    tensorboard_events,
)
from tests.helpers.stores import StoreAndCache, store_keys
from tests.helpers.synthetic import DATASET, TINY_SPEC, SyntheticData

RUN = "boarded"
EPOCHS = 2


def two_epochs(epochs: int = EPOCHS) -> TrainConfig:
    """The tiny run's training (the demo recipe at 40 px) on a MobileNetV3-Small (what the
    event files hold does not depend on the arch), for `epochs` epochs."""
    return build_config("demo", epochs=epochs, image_size=40, batch_size=8,
                        arch="mobilenet_v3_small")


@pytest.fixture
def trained(synthetic_data: SyntheticData, tmp_path: Path) -> StoreAndCache:
    """A private copy of the tiny dataset with run 'boarded' trained for two epochs."""
    return synthetic_data.copy(synthetic_data.trained(TINY_SPEC, RUN, two_epochs()), tmp_path)


def read_events(store: Store, prefix: str, into: Path) -> EventAccumulator:
    """The event files under `prefix` (that folder only, as TensorBoard reads a run), copied
    from the store into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    for key in store_keys(store, prefix):
        if "/" not in key[len(prefix):]:
            store.get_file(key, into / key.rsplit("/", 1)[-1])
    events = EventAccumulator(str(into), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, round(event.value, 5)) for event in events.Scalars(tag)]


def metrics_rows(store: Store, run_id: str) -> list[dict]:
    return RunFiles(store, run_id).read_history()


def test_each_epoch_s_metrics_are_scalars_at_its_step(trained: StoreAndCache,
                                                      tmp_path: Path) -> None:
    store, _ = trained
    rows = metrics_rows(store, RUN)
    events = read_events(store, f"runs/{RUN}/tensorboard/", tmp_path / "events")
    assert set(SCALAR_TAGS.values()) <= set(events.Tags()["scalars"])
    for name, tag in SCALAR_TAGS.items():
        assert scalars(events, tag) == [(row["epoch"], pytest.approx(row[name], abs=1e-5))
                                        for row in rows], tag
    assert [step for step, _ in scalars(events, "loss/train")] == [1, 2]
    assert len(store_keys(store, f"runs/{RUN}/tensorboard/")) == 1


def test_an_extended_run_appends_from_the_epoch_it_resumes(trained: StoreAndCache,
                                                           tmp_path: Path) -> None:
    store, cache = trained
    fit(two_epochs(3), store=store, dataset=DATASET,
        run_id=RUN, cache_dir=cache, device="cpu", workers=0)
    rows = metrics_rows(store, RUN)
    events = read_events(store, f"runs/{RUN}/tensorboard/", tmp_path / "events")
    for name, tag in SCALAR_TAGS.items():
        assert scalars(events, tag) == [(epoch, pytest.approx(rows[epoch - 1][name], abs=1e-5))
                                        for epoch in (1, 2, 3)], tag
    assert len(store_keys(store, f"runs/{RUN}/tensorboard/")) == 2  # its own event file


def row(epoch: int, attempt: int = 0) -> dict:
    """A metrics.jsonl row whose figures say which epoch and which process logged them."""
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "valid_top1": epoch / 10 + attempt,
            "lr": 0.01, "seconds": 1.5}


def board_of(store: Store, run_id: str, history: list[dict], epochs: list[dict]) -> None:
    board = TrainingBoard(RunFiles(store, run_id), history)
    for logged in epochs:
        board.log_epoch(logged)
    board.close()


def test_a_resume_neither_duplicates_nor_skips_a_step(store: Store, tmp_path: Path) -> None:
    # A first process logged epochs 1-3; a kill after its checkpoint 3 and before the upload
    # of epoch 3 is the same story with epoch 3 missing: the resumed process logs epoch 3
    # again from the checkpoint's history, after a purge marker at 3.
    history = [row(1), row(2), row(3)]
    board_of(store, "whole", [], history)
    board_of(store, "killed", [], history[:2])
    for run_id in ("whole", "killed"):
        board_of(store, run_id, history, [row(4, attempt=1), row(5, attempt=1)])
        events = read_events(store, f"runs/{run_id}/tensorboard/", tmp_path / run_id)
        assert scalars(events, "top1/valid") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 1.4),
                                                 (5, 1.5)], run_id
        assert [step for step, _ in scalars(events, "seconds")] == [1, 2, 3, 4, 5]
        assert len(store_keys(store, f"runs/{run_id}/tensorboard/")) == 2


def test_a_run_resumed_without_event_files_gets_its_whole_history(store: Store,
                                                                   tmp_path: Path) -> None:
    # Trained before event files existed, then evaluated: only eval/test has one.
    store.put_bytes("runs/older/tensorboard/eval/test/events.out.tfevents.1.host", b"")
    board_of(store, "older", [row(1), row(2)], [row(3)])
    events = read_events(store, "runs/older/tensorboard/", tmp_path / "events")
    assert scalars(events, "top1/valid") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert scalars(events, "learning_rate") == [(1, 0.01), (2, 0.01), (3, 0.01)]


def test_a_process_that_logs_no_epoch_writes_nothing(store: Store) -> None:
    seen: list[dict] = []
    run = RunFiles(store, "idle")
    with tensorboard_events(run, [], seen.append) as emit:
        emit({"event": "start", "run_id": "idle"})
    with tensorboard_events(run, [], seen.append, enabled=False) as emit:  # not rank 0
        emit({"event": "epoch", **row(1)})
    assert [event["event"] for event in seen] == ["start", "epoch"]
    assert store_keys(store, "runs/idle/") == []


def test_evaluation_adds_its_confusion_matrix_as_an_image(trained: StoreAndCache,
                                                          tmp_path: Path) -> None:
    store, cache = trained
    prefix = f"runs/{RUN}/tensorboard/eval/test/"
    for attempt in (1, 2):  # evaluating again replaces the image, as it does the report
        evaluate_run(store, RUN, cache_dir=cache, device="cpu", workers=0)
        events = read_events(store, prefix, tmp_path / f"events-{attempt}")
        assert events.Tags()["images"] == [CONFUSION_MATRIX_TAG]
        [image] = events.Images(CONFUSION_MATRIX_TAG)
        assert image.step == RunFiles(store, RUN).read_pointer(BEST.pointer)["epoch"]
        with Image.open(store.root / f"runs/{RUN}/eval/test/confusion.png") as png:
            assert (image.width, image.height) == png.size
        assert len(store_keys(store, prefix)) == 1
    training = read_events(store, f"runs/{RUN}/tensorboard/", tmp_path / "training")
    assert training.Tags()["images"] == []  # a TensorBoard run of its own: eval/test


def test_the_confusion_matrix_goes_to_s3(s3_store: Store, tmp_path: Path) -> None:
    run = RunFiles(s3_store, "remote")
    run.write_json(BEST.pointer, {"key": "best-0123456789abcdef.safetensors",
                                  "sha256": "0" * 64, "epoch": 4})
    png = tmp_path / "confusion.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(png)
    key = log_confusion_matrix(run, "valid", png)
    assert key is not None and key.startswith("runs/remote/tensorboard/eval/valid/events.out")
    events = read_events(s3_store, "runs/remote/tensorboard/eval/valid/", tmp_path / "events")
    [image] = events.Images(CONFUSION_MATRIX_TAG)
    assert (image.step, image.width, image.height) == (4, 30, 20)
