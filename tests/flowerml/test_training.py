"""Training on CPU with tiny synthetic data: learning, resume, linear probe, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowerml import training
from flowerml.errors import DatasetNotFound, UserError
from flowerml.ingest import FetchOptions, ingest
from flowerml.recipes import build_config
from flowerml.runs import RunError, RunFiles
from flowerml.storage import LocalStore
from flowerml.synthetic import SyntheticSpec, write_synthetic_archive


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path]:
    """A store holding a published 4-class synthetic dataset, and a cache directory."""
    root = tmp_path_factory.mktemp("training")
    write_synthetic_archive(root / "src", SyntheticSpec(classes=4, per_class=24, image_size=64,
                                                        seed=3))
    store = LocalStore(root / "store")
    ingest(str(root / "src"), store, "flowers102", root / "cache", FetchOptions())
    return store, root / "cache"


def small_config(**overrides):
    values = {"arch": "resnet18", "weights": "none", "epochs": 4, "batch_size": 12,
              "image_size": 48, "optimizer": "adamw", "lr": 3e-3, "backbone_lr_factor": 1.0,
              "warmup_epochs": 0.0, "patience": 0, "label_smoothing": 0.0}
    return build_config("default", **{**values, **overrides})


def run_fit(published, run_id: str, **overrides) -> training.FitResult:
    store, cache = published
    return training.fit(small_config(**overrides), store=store, dataset="flowers102",
                        run_id=run_id, cache_dir=cache, device="cpu", workers=0)


def test_learns_better_than_chance(published) -> None:
    events: list[dict] = []
    store, cache = published
    result = training.fit(small_config(epochs=6), store=store, dataset="flowers102",
                          run_id="learn", cache_dir=cache, device="cpu", workers=0,
                          on_event=events.append)
    assert result.best_valid_top1 >= 0.5  # chance is 0.25
    assert result.epochs_run == 6 and result.resumed_from_epoch is None
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3, 4, 5, 6]
    run = RunFiles(store, "learn")
    weights, record = run.load_weights()
    assert record["epoch"] == result.best_epoch and "head.weight" in weights
    saved = json.loads(store.get_bytes("runs/learn/result.json"))
    assert saved["best_valid_top1"] == result.best_valid_top1
    assert len(store.get_bytes("runs/learn/metrics.jsonl").splitlines()) == 6


def test_rerun_of_a_finished_run_resumes_at_its_end(published) -> None:
    first = run_fit(published, "twice", epochs=2)
    again = run_fit(published, "twice", epochs=2)
    assert again.resumed_from_epoch == 2 and again.epochs_run == 2
    assert again.best_valid_top1 == first.best_valid_top1


def test_linear_probe_computes_features_once(published, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = training.compute_features

    def counting(model, loader, device, amp):
        features, labels = original(model, loader, device, amp)
        calls.append(len(labels))
        return features, labels

    monkeypatch.setattr(training, "compute_features", counting)
    first = run_fit(published, "probe-1", strategy="linear-probe", epochs=20, batch_size=32,
                    lr=1e-2)
    assert calls == [24, 24]  # train and valid, once each, for all 20 epochs
    second = run_fit(published, "probe-2", strategy="linear-probe", epochs=5, batch_size=32,
                     lr=1e-2)
    assert calls == [24, 24]  # a new run with the same backbone reuses the cached features
    assert first.epochs_run == 20 and second.epochs_run == 5
    store, _ = published
    weights, _ = RunFiles(store, "probe-1").load_weights()
    assert any(k.startswith("backbone.") for k in weights)


def test_resume_after_sigkill_matches_an_uninterrupted_run(published, tmp_path: Path) -> None:
    store, cache = published
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "flowerml.cli", "train", "--arch", "resnet18",
               "--weights", "none", "--epochs", "5", "--batch-size", "12", "--image-size", "48",
               "--optimizer", "adamw", "--lr", "0.003", "--device", "cpu", "--workers", "0",
               "--patience", "0", "--json"]
    child = subprocess.Popen([*command, "--run-id", "killed"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = store.root / "runs" / "killed" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = json.loads(checkpoint.read_text())["epoch"]
    assert 1 <= killed_at < 5
    resumed = subprocess.run([*command, "--run-id", "killed"], env=env, capture_output=True,
                             text=True, check=True)
    straight = subprocess.run([*command, "--run-id", "straight"], env=env, capture_output=True,
                              text=True, check=True)
    resumed_result = json.loads(resumed.stdout)
    straight_result = json.loads(straight.stdout)
    assert resumed_result["resumed_from_epoch"] == killed_at
    assert resumed_result["epochs_run"] == straight_result["epochs_run"] == 5
    assert abs(resumed_result["best_valid_top1"] - straight_result["best_valid_top1"]) <= 0.2


def test_ddp_with_two_gloo_processes(published) -> None:
    store, cache = published
    env = {**os.environ, "FLOWERML_STORE": str(store.root), "FLOWERML_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "flowerml.cli", "train", "--run-id", "ddp",
               "--arch", "resnet18", "--weights", "none", "--epochs", "2", "--batch-size", "8",
               "--image-size", "48", "--device", "cpu", "--workers", "0", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # rank 0 speaks for the run
    assert results[0]["world_size"] == 2 and results[0]["epochs_run"] == 2
    assert RunFiles(store, "ddp").has_checkpoint()


def test_corrupt_checkpoint_is_refused(published) -> None:
    store, _ = published
    run_fit(published, "corrupt", epochs=1)
    key = "runs/corrupt/checkpoint.pt"
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])
    with pytest.raises(RunError, match="runs/corrupt/checkpoint.pt: sha256 mismatch"):
        run_fit(published, "corrupt", epochs=1)


def test_changed_configuration_is_refused_on_resume(published) -> None:
    run_fit(published, "changed", epochs=1)
    with pytest.raises(RunError, match="different configuration.*lr"):
        run_fit(published, "changed", epochs=1, lr=0.1)


def test_checkpoint_with_other_classes_is_refused(published, tmp_path: Path) -> None:
    store, cache = published
    run_fit(published, "classes", epochs=1)
    other = tmp_path / "other"
    write_synthetic_archive(other, SyntheticSpec(classes=3, per_class=6, image_size=40, seed=9))
    ingest(str(other), store, "three", cache, FetchOptions())
    (store.root / "runs" / "classes-3").mkdir(parents=True)
    for name in ("checkpoint.pt", "checkpoint.json"):
        (store.root / "runs" / "classes-3" / name).write_bytes(
            (store.root / "runs" / "classes" / name).read_bytes())
    with pytest.raises(RunError, match="has 4 classes but the dataset has 3"):
        training.fit(small_config(epochs=1), store=store, dataset="three", run_id="classes-3",
                     cache_dir=cache, device="cpu", workers=0)


def test_unpublished_dataset(published) -> None:
    store, cache = published
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


def test_cuda_without_gpu(published, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is available"):
        training.fit(small_config(), store=published[0], dataset="flowers102", run_id="gpu",
                     cache_dir=published[1], device="cuda", workers=0)


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [training.lr_factor(step, 100, 10, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[99] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert training.lr_factor(50, 100, 0, "constant") == 1.0
