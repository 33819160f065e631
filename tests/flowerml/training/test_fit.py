"""Training on CPU with tiny synthetic data: learning, bit-exact resume, linear probe, DDP,
bad input. The learning test has its uninterrupted run 'straight' (ResNet-18, which learns
here); every test where learning is not the point reuses 'straight-small' (MobileNetV3-Small:
~3x cheaper steps, an 18 MB checkpoint instead of 134 MB)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from flowerml.core.errors import DatasetNotFound, UserError
from flowerml.core.recipes import build_config
from flowerml.data.ingest import ingest
from flowerml.data.source_files import FetchOptions
from flowerml.data.synthetic import SyntheticSpec
from flowerml.io.storage_local import LocalStore
from flowerml.training import fit as training
from flowerml.training import linear_probe
from flowerml.training.optimization import build_scheduler, follow_schedule, lr_factor
from flowerml.training.run_record import start_run
from flowerml.training.runs import RunError, RunFiles
from tests.helpers.cli import invoke
from tests.helpers.interrupts import (
    DiedBeforeCheckpoint,
    die_before_checkpoint,
    kill_at_first_checkpoint,
)
from tests.helpers.stores import StoreAndCache, copy_tree
from tests.helpers.synthetic import SyntheticData

TRAIN_SPEC = SyntheticSpec(classes=4, per_class=24, image_size=64, seed=3)
"""4 classes x 24 images: 6 train, 6 valid and 12 test images per class."""

EPOCHS = 3

SMALL = "mobilenet_v3_small"
"""The arch of the runs that test resuming, restarting and extending, not learning."""


@pytest.fixture(scope="module")
def published_store(synthetic_data: SyntheticData,
                    tmp_path_factory: pytest.TempPathFactory) -> StoreAndCache:
    """The module's own store with the 4-class training dataset published, and its cache."""
    return synthetic_data.copy(synthetic_data.published(TRAIN_SPEC),
                               tmp_path_factory.mktemp("training"))


def small_config(**overrides):
    values = {"arch": "resnet18", "weights": "none", "epochs": EPOCHS, "batch_size": 12,
              "image_size": 32, "optimizer": "adamw", "lr": 1e-3, "backbone_lr_factor": 1.0,
              "warmup_epochs": 0.0, "patience": 0, "label_smoothing": 0.0}
    return build_config("default", **{**values, **overrides})


def run_fit(published_store: StoreAndCache, run_id: str, *, workers: int = 0,
            on_event=None, checkpoint_every: int = 1, **overrides) -> training.FitResult:
    store, cache = published_store
    return training.fit(small_config(**overrides), store=store, dataset="flowers102",
                        run_id=run_id, cache_dir=cache, device="cpu", workers=workers,
                        on_event=on_event, checkpoint_every=checkpoint_every)


@pytest.fixture(scope="module")
def uninterrupted_run(published_store: StoreAndCache) -> tuple[training.FitResult, list[dict]]:
    """Run 'straight': small_config() trained in one go, and the events it emitted. It learns;
    what it leaves for a resume is checked on 'straight-small', so it checkpoints only its last
    epoch (two 134 MB checkpoints fewer)."""
    events: list[dict] = []
    return run_fit(published_store, "straight", on_event=events.append,
                   checkpoint_every=EPOCHS), events


@pytest.fixture(scope="module")
def small_run(published_store: StoreAndCache) -> training.FitResult:
    """Run 'straight-small': small_config(arch=SMALL) trained in one go, the reference of the
    resume tests."""
    return run_fit(published_store, "straight-small", arch=SMALL)


def copy_run(store: LocalStore, run_id: str, new_id: str) -> None:
    copy_tree(store.root / "runs" / run_id, store.root / "runs" / new_id)


def test_learns_better_than_chance(published_store: StoreAndCache, uninterrupted_run) -> None:
    store, _ = published_store
    result, events = uninterrupted_run
    assert result.best_valid_top1 >= 0.5  # chance is 0.25
    assert result.epochs_run == EPOCHS and result.resumed_from_epoch is None
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(1, EPOCHS + 1))
    run = RunFiles(store, "straight")
    weights, record = run.load_weights()
    assert record["epoch"] == result.best_epoch and "head.weight" in weights
    assert run.weights_key() == f"runs/straight/{record['key']}"
    assert result.checkpoint == store.location(run.weights_key())  # in full: a path or s3://
    saved = json.loads(store.get_bytes("runs/straight/result.json"))
    assert saved["best_valid_top1"] == result.best_valid_top1
    assert len(store.get_bytes("runs/straight/metrics.jsonl").splitlines()) == EPOCHS


def test_rerun_of_a_finished_run_resumes_at_its_end(published_store: StoreAndCache,
                                                     small_run) -> None:
    first = small_run
    again = run_fit(published_store, "straight-small", arch=SMALL)
    assert again.resumed_from_epoch == EPOCHS and again.epochs_run == EPOCHS
    assert again.best_valid_top1 == first.best_valid_top1


def test_linear_probe_computes_features_once(published_store: StoreAndCache,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = linear_probe.compute_features

    def counting(model, loader, device, amp, *preprocessing):
        features, labels = original(model, loader, device, amp, *preprocessing)
        calls.append(len(labels))
        return features, labels

    monkeypatch.setattr(linear_probe, "compute_features", counting)
    first = run_fit(published_store, "probe-1", strategy="linear-probe", epochs=20,
                    batch_size=32, lr=1e-2)
    assert calls == [24, 24]  # train and valid, once each, for all 20 epochs
    second = run_fit(published_store, "probe-2", strategy="linear-probe", epochs=5,
                     batch_size=32, lr=1e-2)
    assert calls == [24, 24]  # a new run with the same backbone reuses the cached features
    assert first.epochs_run == 20 and second.epochs_run == 5
    store, _ = published_store
    weights, _ = RunFiles(store, "probe-1").load_weights()
    assert any(k.startswith("backbone.") for k in weights)
    checkpoint = RunFiles(store, "probe-1").load_checkpoint()
    head = {k.removeprefix("head.") for k in weights if k.startswith("head.")}
    assert set(checkpoint["model"]) == head == set(checkpoint["best_head"])


def test_a_checkpoint_keeps_the_layout_earlier_runs_were_written_with(
        published_store: StoreAndCache, small_run) -> None:
    """Runs checkpointed by earlier releases resume: the layout and the state's fields stay."""
    store, _ = published_store
    checkpoint = RunFiles(store, "straight-small").load_checkpoint()
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "scaler", "rng", "state",
                               "best_head", "classes"}
    assert set(checkpoint["state"]) == {"epoch", "best_top1", "best_epoch", "bad_epochs",
                                        "history", "train_images", "train_seconds",
                                        "stopped_early"}
    assert set(checkpoint["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert checkpoint["best_head"] is None and checkpoint["classes"] == 4
    assert "head.weight" in checkpoint["model"] and checkpoint["state"]["epoch"] == EPOCHS


def assert_same_run(store: LocalStore, run_id: str, reference: str) -> None:
    """Bit for bit the same weights (last epoch's and best), the same metrics per epoch."""
    for load in (lambda run: run.load_checkpoint()["model"], lambda run: run.load_weights()[0]):
        ours, theirs = load(RunFiles(store, run_id)), load(RunFiles(store, reference))
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []

    def metrics(run: str) -> list[dict]:
        rows = [json.loads(line) for line in
                store.get_bytes(f"runs/{run}/metrics.jsonl").splitlines()]
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                for row in rows]

    assert metrics(run_id) == metrics(reference)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resumed_run_has_exactly_the_weights_of_an_uninterrupted_run(
        published_store: StoreAndCache, small_run, workers: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU training resumes bit-exactly: each epoch's order and augmentations come from
    (seed, epoch) alone, the RNG states from the checkpoint; DataLoader workers (2 here, 0 in
    the reference run) change nothing."""
    store, _ = published_store
    run_id = f"interrupted-{workers}"
    die_before_checkpoint(monkeypatch, epoch=2)
    with pytest.raises(DiedBeforeCheckpoint):
        run_fit(published_store, run_id, workers=workers, arch=SMALL)
    assert RunFiles(store, run_id).read_json("checkpoint.json")["epoch"] == 1
    monkeypatch.undo()
    resumed = run_fit(published_store, run_id, workers=workers, arch=SMALL)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == EPOCHS
    assert resumed.best_valid_top1 == small_run.best_valid_top1
    assert_same_run(store, run_id, "straight-small")


def test_a_run_checkpointed_every_second_epoch_resumes_from_its_last_checkpoint(
        published_store: StoreAndCache, small_run,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint_every=2 over 3 epochs checkpoints after epoch 2 and the last only; a run that
    dies before its last checkpoint resumes from epoch 2, does epoch 3 again and ends with
    exactly the uninterrupted run's weights and history."""
    store, _ = published_store
    saved: list[int] = []
    save = RunFiles.save_checkpoint

    def spy(self: RunFiles, state: dict, epoch: int) -> None:
        saved.append(epoch)
        save(self, state, epoch)

    monkeypatch.setattr(RunFiles, "save_checkpoint", spy)
    die_before_checkpoint(monkeypatch, epoch=EPOCHS)
    with pytest.raises(DiedBeforeCheckpoint):
        run_fit(published_store, "every-2", checkpoint_every=2, arch=SMALL)
    assert saved == [2]
    assert RunFiles(store, "every-2").read_json("checkpoint.json")["epoch"] == 2
    monkeypatch.undo()
    resumed = run_fit(published_store, "every-2", checkpoint_every=2, arch=SMALL)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == EPOCHS
    assert_same_run(store, "every-2", "straight-small")


@pytest.mark.slow  # a child process: a training run killed with SIGKILL
def test_resume_after_sigkill_matches_an_uninterrupted_run(published_store: StoreAndCache,
                                                           small_run, tmp_path) -> None:
    """The kill needs a real process (`python -m flowerml.cli`); the
    same `flowerml train` resumes it in-process."""
    store, cache = published_store
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache)}
    args = ["train", "--config", json.dumps(small_config(arch=SMALL).to_json()), "--device", "cpu",
            "--workers", "0", "--run-id", "killed", "--json"]
    killed_at = kill_at_first_checkpoint(args, env, store.root / "runs" / "killed",
                                         tmp_path / "child")
    assert 1 <= killed_at < EPOCHS
    resumed = invoke(*args, store=store, cache=cache)
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    assert result["resumed_from_epoch"] == killed_at and result["epochs_run"] == EPOCHS
    assert_same_run(store, "killed", "straight-small")


@pytest.mark.slow  # torchrun: two training processes
def test_ddp_with_two_gloo_processes(published_store: StoreAndCache) -> None:
    store, cache = published_store
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "flowerml.cli", "train", "--run-id", "ddp",
               "--arch", SMALL, "--weights", "none", "--epochs", "2", "--batch-size", "8",
               "--image-size", "32", "--device", "cpu", "--workers", "0", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 speaks for the run
    assert results[0]["world_size"] == 2 and results[0]["epochs_run"] == 2
    assert RunFiles(store, "ddp").has_checkpoint()


def test_corrupt_checkpoint_is_refused(published_store: StoreAndCache, small_run) -> None:
    store, _ = published_store
    copy_run(store, "straight-small", "corrupt")
    key = RunFiles(store, "corrupt").checkpoint_key()  # the blob checkpoint.json names
    assert key.startswith("runs/corrupt/checkpoint-")
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])
    with pytest.raises(RunError, match=rf"{re.escape(key)}: sha256 mismatch"):
        run_fit(published_store, "corrupt", arch=SMALL)


def test_changed_configuration_is_refused_on_resume(published_store: StoreAndCache,
                                                    small_run) -> None:
    with pytest.raises(RunError, match="different configuration.*lr"):
        run_fit(published_store, "straight-small", lr=0.1, arch=SMALL)


def run_files(store: LocalStore, run_id: str) -> list[str]:
    """Every file of the run, by its path in the run's folder (tensorboard/... included)."""
    folder = store.root / "runs" / run_id
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_bad_weights_write_nothing_and_leave_the_run_id_free(published_store: StoreAndCache,
                                                             tmp_path) -> None:
    """A typo in --weights must not claim a named run id: nothing is written before the
    weights are resolved and the model is built, so the corrected call trains under it."""
    store, _ = published_store
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")  # resolves (it exists), fails to load
    for weights, message in [(str(tmp_path / "missing.pth"), "no such file"),
                             ("s3://bucket", "needs s3://bucket/key"),
                             (str(garbage), "cannot be loaded as weights")]:
        with pytest.raises(UserError, match=message):
            run_fit(published_store, "typo", weights=weights, arch=SMALL)
        assert run_files(store, "typo") == []
    result = run_fit(published_store, "typo", epochs=1, arch=SMALL)
    assert result.epochs_run == 1 and result.resumed_from_epoch is None
    assert RunFiles(store, "typo").read_json("config.json")["config"]["weights"] == "none"


def test_run_without_a_checkpoint_restarts_with_a_new_config(
        published_store: StoreAndCache, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = published_store
    die_before_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(DiedBeforeCheckpoint):
        run_fit(published_store, "restart", epochs=2, arch=SMALL)
    monkeypatch.undo()
    run = RunFiles(store, "restart")
    assert run.exists() and not run.has_checkpoint()
    assert run.read_json("best.json")["epoch"] == 1
    events: list[dict] = []
    result = run_fit(published_store, "restart", epochs=1, lr=2e-3, on_event=events.append,
                     arch=SMALL)
    assert result.resumed_from_epoch is None and result.epochs_run == 1
    assert not any(e["event"] == "resumed" for e in events)
    assert run.read_json("config.json")["config"]["lr"] == 2e-3
    assert len(store.get_bytes("runs/restart/metrics.jsonl").splitlines()) == 1
    # Once it has a checkpoint, the new config is the one it keeps.
    with pytest.raises(RunError, match="different configuration.*lr"):
        run_fit(published_store, "restart", epochs=1, lr=1e-3, arch=SMALL)
    assert [name for name in run_files(store, "restart") if name.startswith("best-")] == [
        run.weights_key().rsplit("/", 1)[1]]


def test_restart_removes_what_the_dead_first_epoch_left(published_store: StoreAndCache,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that dies before its first epoch ends leaves no weights of the old config."""
    store, _ = published_store
    die_before_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(DiedBeforeCheckpoint):
        run_fit(published_store, "abandoned", epochs=2, arch=SMALL)
    assert "best.json" in run_files(store, "abandoned")
    run = RunFiles(store, "abandoned")
    record = run.record()
    start_run(run, record.model_copy(update={"config": record.config.model_copy(
        update={"arch": "vgg16"})}))
    assert run_files(store, "abandoned") == ["config.json"]


def test_checkpoint_with_other_classes_is_refused(published_store: StoreAndCache,
                                                  synthetic_data: SyntheticData,
                                                  small_run) -> None:
    store, cache = published_store
    other = synthetic_data.source(SyntheticSpec(classes=3, per_class=6, image_size=40, seed=9))
    ingest(str(other), store, "three", cache, FetchOptions())
    (store.root / "runs" / "classes-3").mkdir(parents=True)
    blob = RunFiles(store, "straight-small").read_json("checkpoint.json")["key"]
    for name in (blob, "checkpoint.json"):
        os.link(store.root / "runs" / "straight-small" / name,
                store.root / "runs" / "classes-3" / name)
    with pytest.raises(RunError, match="has 4 classes but the dataset has 3"):
        training.fit(small_config(arch=SMALL), store=store, dataset="three", run_id="classes-3",
                     cache_dir=cache, device="cpu", workers=0)


def test_unpublished_dataset(published_store: StoreAndCache) -> None:
    store, cache = published_store
    with pytest.raises(DatasetNotFound, match="not published"):
        training.fit(small_config(), store=store, dataset="nothing", run_id="x", cache_dir=cache,
                     device="cpu", workers=0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"arch": "resnet9"}, "--arch must be one of"),
    ({"strategy": "distill"}, "--strategy must be one of"),
    ({"augment": "heavy"}, "--augment must be one of"),
    ({"batch_size": 0}, "--batch-size must be between 1 and 4096"),
    ({"lr": 50.0}, "--lr must be between"),
    ({"optimizer": "lion"}, "--optimizer must be one of"),
])
def test_bad_options(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        small_config(**overrides)


def test_cuda_without_gpu(published_store: StoreAndCache,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    store, cache = published_store
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is available"):
        training.fit(small_config(), store=store, dataset="flowers102", run_id="gpu",
                     cache_dir=cache, device="cuda", workers=0)


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(step, 100, 10, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[99] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(50, 100, 0, "constant") == 1.0


# --------------------------------------------------------------------------------------------
# Extending a trained run with more epochs


def history_without_timings(store: LocalStore, run_id: str) -> list[dict]:
    rows = [json.loads(line) for line in store.get_bytes(f"runs/{run_id}/metrics.jsonl").splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
            for row in rows]


@pytest.fixture(scope="module")
def extended_run(published_store: StoreAndCache, small_run
                 ) -> tuple[training.FitResult, list[dict]]:
    """Run 'longer': a copy of 'straight-small' (3 epochs) given epochs=5, and the events it
    emitted."""
    copy_run(published_store.store, "straight-small", "longer")
    events: list[dict] = []
    return run_fit(published_store, "longer", epochs=5, on_event=events.append,
                   arch=SMALL), events


def test_more_epochs_continue_a_finished_run_from_its_checkpoint(
        published_store: StoreAndCache, extended_run) -> None:
    store, _ = published_store
    result, events = extended_run
    assert result.resumed_from_epoch == EPOCHS and result.epochs_run == 5
    history = history_without_timings(store, "longer")
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[:EPOCHS] == history_without_timings(store, "straight-small")
    # The epochs left follow the 5-epoch cosine from where it is at epoch 3 (no warm-up here),
    # not the 3-epoch one, which ended at zero.
    assert history[3]["lr"] == pytest.approx(1e-3 * lr_factor(4, 5, 0, "cosine"))
    assert history[4]["lr"] == pytest.approx(0.0, abs=1e-12)
    record = RunFiles(store, "longer").read_json("config.json")
    assert record["config"]["epochs"] == 5
    [extension] = record["extensions"]
    assert {k: v for k, v in extension.items() if k != "time"} == {
        "epochs_before": EPOCHS, "epochs": 5, "at_epoch": EPOCHS}
    assert [e for e in events if e["event"] == "extended"] == [
        {"event": "extended", "run_id": "longer", **extension}]
    assert RunFiles(store, "longer").read_json("result.json")["epochs_run"] == 5


def test_an_extended_run_resumes_as_itself(published_store: StoreAndCache, extended_run) -> None:
    """Once extended, the new length is the run's configuration: the same call resumes it
    (nothing recorded again) and the old length is a different configuration."""
    store, _ = published_store
    events: list[dict] = []
    again = run_fit(published_store, "longer", epochs=5, on_event=events.append, arch=SMALL)
    assert again.resumed_from_epoch == 5 and again.epochs_run == 5
    assert not any(e["event"] == "extended" for e in events)
    assert len(RunFiles(store, "longer").read_json("config.json")["extensions"]) == 1
    with pytest.raises(RunError, match=r"different configuration \(epochs 5 -> 3\); a trained "
                                       r"run takes only a larger --epochs"):
        run_fit(published_store, "longer", arch=SMALL)


def test_an_interrupted_extension_resumes_bit_for_bit(published_store: StoreAndCache,
                                                      extended_run,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = published_store
    copy_run(store, "straight-small", "longer-interrupted")
    die_before_checkpoint(monkeypatch, epoch=5)
    with pytest.raises(DiedBeforeCheckpoint):
        run_fit(published_store, "longer-interrupted", epochs=5, arch=SMALL)
    assert RunFiles(store, "longer-interrupted").read_json("checkpoint.json")["epoch"] == 4
    monkeypatch.undo()
    resumed = run_fit(published_store, "longer-interrupted", epochs=5, arch=SMALL)
    assert resumed.resumed_from_epoch == 4 and resumed.epochs_run == 5
    assert_same_run(store, "longer-interrupted", "longer")


@pytest.mark.parametrize(("overrides", "shown"), [
    ({"epochs": 5, "lr": 0.1}, "epochs 3 -> 5, lr 0.001 -> 0.1"),
    ({"epochs": 2}, "epochs 3 -> 2"),
])
def test_fewer_epochs_or_another_change_are_refused_and_write_nothing(
        published_store: StoreAndCache, small_run, overrides: dict, shown: str) -> None:
    store, _ = published_store
    run_id = f"changed-{len(overrides)}"
    copy_run(store, "straight-small", run_id)
    before = {name: (store.root / "runs" / run_id / name).read_bytes()
              for name in run_files(store, run_id)}
    with pytest.raises(RunError, match=re.escape(f"different configuration ({shown})")):
        run_fit(published_store, run_id, arch=SMALL, **overrides)
    assert {name: (store.root / "runs" / run_id / name).read_bytes()
            for name in run_files(store, run_id)} == before


def test_a_run_that_stopped_early_is_not_extended(published_store: StoreAndCache,
                                                  small_run) -> None:
    store, _ = published_store
    copy_run(store, "straight-small", "stopped-early")
    run = RunFiles(store, "stopped-early")
    saved = run.load_checkpoint()
    saved["state"]["stopped_early"] = True
    run.save_checkpoint(saved, EPOCHS)
    before = {name: (store.root / "runs" / "stopped-early" / name).read_bytes()
              for name in run_files(store, "stopped-early")}
    with pytest.raises(RunError, match="stopped early at epoch 3 .*more --epochs would not "
                                       "train it further"):
        run_fit(published_store, "stopped-early", epochs=5, arch=SMALL)
    assert {name: (store.root / "runs" / "stopped-early" / name).read_bytes()
            for name in run_files(store, "stopped-early")} == before


def test_a_restored_optimizer_takes_the_longer_schedules_rate() -> None:
    """The optimizer's saved rate is the old schedule's (zero at a cosine's end); after
    `follow_schedule` it is the new schedule's at the same step, for the very next step."""
    def optimised(epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
        return optimizer, build_scheduler(optimizer, small_config(epochs=epochs), 4)

    short, short_schedule = optimised(2)
    for _ in range(8):
        short.step()
        short_schedule.step()
    assert short.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    longer, longer_schedule = optimised(4)
    longer.load_state_dict(short.state_dict())
    longer_schedule.load_state_dict(short_schedule.state_dict())
    follow_schedule(longer, longer_schedule)
    expected = 0.5 * lr_factor(8, 16, 0, "cosine")
    assert longer.param_groups[0]["lr"] == pytest.approx(expected)
    assert longer_schedule.get_last_lr() == pytest.approx([expected])
    longer.step()
    longer_schedule.step()
    assert longer.param_groups[0]["lr"] == pytest.approx(
        0.5 * lr_factor(9, 16, 0, "cosine"))


def test_an_epoch_is_announced_only_once_its_checkpoint_is_on_the_store(
        published_store: StoreAndCache) -> None:
    """Whoever sees "epoch N" and stops the run resumes it from epoch N: the epoch event and
    the progress line come after the checkpoint they announce is durable."""
    store, _ = published_store
    checkpointed_at: list[tuple[int, int]] = []

    def on_event(event: dict) -> None:
        if event["event"] == "epoch":
            saved = RunFiles(store, "announced").read_json("checkpoint.json")["epoch"]
            checkpointed_at.append((event["epoch"], saved))

    run_fit(published_store, "announced", epochs=2, on_event=on_event, arch=SMALL)
    assert checkpointed_at == [(1, 1), (2, 2)]


# --------------------------------------------------------------------------------------------
# The weights' own preprocessing


def test_a_run_without_weights_records_todays_preprocessing(published_store: StoreAndCache,
                                                            small_run) -> None:
    from flowerml.data.preprocessing import default_preprocessing
    from flowerml.evaluation.inference import load_trained_model

    store, _ = published_store
    record = json.loads(store.get_bytes("runs/straight-small/config.json"))
    assert record["preprocessing"] == {"resize": 37, "crop": 32, "interpolation": "bilinear",
                                       "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]}
    # A run recorded before the field existed reads as the same values.
    copy_run(store, "straight-small", "recorded-before")
    del record["preprocessing"]
    store.put_bytes("runs/recorded-before/config.json", json.dumps(record).encode())
    loaded = load_trained_model(store, "recorded-before", device="cpu")
    assert loaded.preprocessing == default_preprocessing(32)


def test_a_run_trains_validates_and_evaluates_at_its_weights_preprocessing(
        published_store: StoreAndCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights measured at their own resize (as ResNet-152 V2's 232 for 224): config.json
    records it, train and valid are decoded at it, an extension keeps what was recorded, and
    the evaluation reads the test split at it too."""
    from flowerml.data.preprocessing import Preprocessing
    from flowerml.evaluation.inference import evaluate_run, load_trained_model

    store, cache = published_store
    own = Preprocessing(36, 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25),
                        interpolation="bicubic")
    asked: list[tuple[str, int]] = []

    def weights_preprocessing(weights, image_size):
        asked.append((weights.source, image_size))
        return own

    monkeypatch.setattr(training, "weights_preprocessing", weights_preprocessing)
    run_fit(published_store, "own-preprocessing", epochs=1, arch=SMALL)
    assert asked == [("none", 32)]
    record = json.loads(store.get_bytes("runs/own-preprocessing/config.json"))
    assert record["preprocessing"] == own.to_json()
    caches = {path.name.split("-")[0] for path in cache.rglob("*-36px-crop32-bicubic-*.npy")}
    assert caches == {"train", "valid"}

    monkeypatch.setattr(training, "weights_preprocessing",
                        lambda *_: pytest.fail("a recorded run asked for its weights again"))
    extended = run_fit(published_store, "own-preprocessing", epochs=2, arch=SMALL)
    assert extended.epochs_run == 2
    assert json.loads(store.get_bytes("runs/own-preprocessing/config.json"))[
        "preprocessing"] == own.to_json()

    assert load_trained_model(store, "own-preprocessing", device="cpu").preprocessing == own
    evaluate_run(store, "own-preprocessing", cache_dir=cache, device="cpu", workers=0)
    assert list(cache.rglob("test-36px-crop32-bicubic-*.npy"))


def test_the_linear_probes_features_are_kept_per_preprocessing(
        published_store: StoreAndCache) -> None:
    """Features computed at one resize are never reused at another; today's preprocessing keeps
    the keys features were cached under before it was recorded."""
    from flowerml.data.manifest import resolve_dataset
    from flowerml.data.preprocessing import Preprocessing, default_preprocessing

    store, _ = published_store
    published = resolve_dataset(store, "flowers102")
    config = small_config(strategy="linear-probe")
    before = linear_probe.feature_cache_key(config, published, "train")
    assert linear_probe.feature_cache_key(config, published, "train",
                                          default_preprocessing(32)) == before
    assert linear_probe.feature_cache_key(config, published, "train",
                                          Preprocessing(36, 32)) != before
