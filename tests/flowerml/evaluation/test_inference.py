"""Evaluate the tiny trained run (a copy per module), through the library and the CLI (predicting
is tested in test_prediction.py and cli/test_predict.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from click.testing import Result

from flowerml.evaluation.inference import Evaluation, eval_batch_size, evaluate_run
from flowerml.evaluation.predictions import (
    ComparisonError,
    EvaluationMetrics,
    decode_logits,
    decode_predictions,
    read_logits,
)
from flowerml.io.storage_local import LocalStore
from flowerml.training.runs import RunFiles
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.stores import StoreAndCache, copy_tree


class Evaluated(NamedTuple):
    store: LocalStore
    cache: Path
    outcome: Evaluation


@pytest.fixture(scope="module")
def evaluated(tiny_run: StoreAndCache, tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    """The tiny run evaluated once through the library, on a copy of the module's store that
    nothing else evaluates (the tests below read what that one evaluation wrote)."""
    root = tmp_path_factory.mktemp("evaluated")
    store = LocalStore(copy_tree(tiny_run.store.root, root / "store"))
    cache = copy_tree(tiny_run.cache, root / "cache")
    return Evaluated(store, cache, evaluate_run(store, "tiny", cache_dir=cache, device="cpu",
                                                workers=0))


@pytest.fixture(scope="module")
def cli_evaluated(tiny_run: StoreAndCache) -> tuple[Result, bytes]:
    """`flowerml evaluate --run tiny --json` on the module's store, once: its result and the
    predictions.jsonl it wrote."""
    store, cache = tiny_run
    result = invoke("evaluate", "--run", "tiny", "--device", "cpu", "--workers", "0", "--json",
                    store=store, cache=cache)
    return result, store.get_bytes("runs/tiny/eval/test/predictions.jsonl")


def test_evaluate_publishes_report_and_plots(evaluated: Evaluated) -> None:
    store, _, outcome = evaluated
    summary = outcome.metrics.summary()
    assert summary["n"] == 24  # the test split: 6 per class
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 1.0
    keys = {info.key for info in store.list("runs/tiny/eval/test/")}
    assert {f"runs/tiny/eval/test/{n}" for n in ("report.md", "metrics.json", "per_class.json",
                                                  "confusion.png", "curves.png")} <= keys
    report = store.get_bytes(outcome.report_key).decode()
    assert "pink primrose" in report and "confusion.png" in report


def test_evaluate_keeps_every_images_full_logits_checksummed(evaluated: Evaluated) -> None:
    """logits.npy beside predictions.jsonl: float32 [images, classes], same order, its sha256
    and shape in metrics.json; a changed byte is refused on read."""
    import hashlib

    store = evaluated.store
    folder = "runs/tiny/eval/test"
    metrics = EvaluationMetrics.model_validate_json(store.get_bytes(f"{folder}/metrics.json"))
    data = store.get_bytes(f"{folder}/logits.npy")
    record = metrics.predictions.logits
    assert (record.file, record.dtype, record.precision, record.shape) == (
        "logits.npy", "float32", "float32", [24, 4])
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    logits = read_logits(metrics.predictions, lambda name: store.get_bytes(f"{folder}/{name}"),
                         folder)
    rows = decode_predictions(store.get_bytes(f"{folder}/predictions.jsonl"), "rows")
    assert [int(i) + 1 for i in logits.argmax(1)] == [row.predicted for row in rows]
    assert decode_logits(data, "x").dtype == "float32"
    with pytest.raises(ComparisonError, match="logits.npy: sha256 does not match"):
        read_logits(metrics.predictions, lambda name: data[:-1] + b"\1", folder)


def test_evaluate_cli_json(tiny_run: StoreAndCache, cli_evaluated: tuple[Result, bytes]
                          ) -> None:
    store, _ = tiny_run
    result, _ = cli_evaluated
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"top1", "top5", "mean_class_accuracy", "loss", "n", "report"} <= set(summary)
    assert summary["report"] == f"{store.root}/runs/tiny/eval/test/report.md"


def test_the_batch_size_changes_nothing_but_the_passes(
        tiny_run: StoreAndCache, cli_evaluated: tuple[Result, bytes]) -> None:
    """`--batch-size` (and the GPU's larger default) only changes how images are grouped: the
    metrics and per-image predictions are the same, the last batch partial or not."""
    store, cache = tiny_run
    whole = json.loads(cli_evaluated[0].stdout)  # the default batch: all 24 in one
    whole_predictions = cli_evaluated[1]
    fives = invoke("evaluate", "--run", "tiny", "--device", "cpu", "--workers", "0",
                   "--batch-size", "5", "--json", store=store, cache=cache)
    assert fives.exit_code == 0, fives.output
    split = json.loads(fives.stdout)
    for key in ("top1", "top5", "n", "mean_class_accuracy"):
        assert split[key] == whole[key]
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    rows = decode_predictions(store.get_bytes("runs/tiny/eval/test/predictions.jsonl"), "5s")
    assert len(rows) == 24
    for row, before in zip(rows, decode_predictions(whole_predictions, "whole"), strict=True):
        assert (row.key, row.label, row.top) == (before.key, before.label, before.top)
        assert row.probabilities == pytest.approx(before.probabilities, abs=1e-5)
    assert eval_batch_size(torch.device("cuda")) == 256 and \
        eval_batch_size(torch.device("cpu")) == 64
    assert_refused(invoke("evaluate", "--run", "tiny", "--batch-size", "0", store=store,
                          cache=cache), "--batch-size")


def test_altered_image_on_store_is_refused(tiny_run: StoreAndCache, tmp_path: Path) -> None:
    store, _ = tiny_run
    current = json.loads(store.get_bytes("datasets/flowers102/CURRENT"))
    manifest = json.loads(store.get_bytes(f"datasets/flowers102/{current['version']}/"
                                          "manifest.json"))
    entry = next(e for e in manifest["files"] if e["split"] == "test")
    key = f"datasets/flowers102/{current['version']}/{entry['key']}"
    original = store.get_bytes(key)
    store.put_bytes(key, original[:-10] + b"0123456789")
    try:
        result = invoke("evaluate", "--run", "tiny", "--device", "cpu", "--workers", "0",
                        store=store, cache=tmp_path / "fresh-cache")
        assert_refused(result, f"{entry['key']}: sha256 mismatch")
    finally:
        store.put_bytes(key, original)


def test_tampered_weights_are_refused(tiny_run: StoreAndCache) -> None:
    store, cache = tiny_run
    key = RunFiles(store, "tiny").weights_key()  # the blob best.json names
    assert key.startswith("runs/tiny/best-")
    original = store.get_bytes(key)
    store.put_bytes(key, original[:-4] + b"\x00\x00\x00\x01")
    try:
        assert_refused(invoke("evaluate", "--run", "tiny", "--device", "cpu", store=store,
                              cache=cache),
                       f"{key}: sha256 mismatch")
    finally:
        store.put_bytes(key, original)


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "resnet9"], "--arch must be one of"),
    (["--strategy", "distill"], "--strategy must be one of"),
    (["--augment", "heavy"], "--augment must be one of"),
    (["--batch-size", "0"], "--batch-size must be between"),
    (["--lr", "-1"], "--lr must be between"),
    (["--recipe", "fast"], "--recipe must be one of"),
    (["--dataset", "missing"], "not published"),
])
def test_train_bad_options(tiny_run: StoreAndCache, args: list[str], message: str) -> None:
    store, cache = tiny_run
    if "--recipe" not in args:
        args = ["--recipe", "demo", "--device", "cpu", *args]
    assert_refused(invoke("train", *args, store=store, cache=cache), message)


def test_train_cli_json(tiny_run: StoreAndCache) -> None:
    store, cache = tiny_run
    result = invoke("train", "--recipe", "demo", "--epochs", "1", "--image-size", "40",
                    "--device", "cpu", "--workers", "0", "--run-id", "cli-run", "--json",
                    store=store, cache=cache)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"run_id", "checkpoint", "best_valid_top1", "epochs_run", "resumed_from_epoch",
            "seconds", "images_per_second"} <= set(summary)
    assert summary["run_id"] == "cli-run" and summary["epochs_run"] == 1
    assert summary["checkpoint"] == store.location(RunFiles(store, "cli-run").weights_key())


def test_evaluate_stores_every_images_top5_beside_the_metrics(evaluated: Evaluated) -> None:
    from flowerml.core.files import sha256_hex
    from flowerml.data.manifest import resolve_dataset
    from flowerml.evaluation.predictions import decode_predictions, run_predictions

    store, _, outcome = evaluated
    data = store.get_bytes("runs/tiny/eval/test/predictions.jsonl")
    rows = decode_predictions(data, "predictions.jsonl")
    entries = resolve_dataset(store, "flowers102").split_files("test")
    assert [(r.key, r.label) for r in rows] == [(e.key, e.label) for e in entries]
    for row in rows:
        assert len(row.top) == 4 and sorted(row.top) == [1, 2, 3, 4]  # k = min(5, 4 classes)
        assert list(row.probabilities) == sorted(row.probabilities, reverse=True)
        assert 0.99 <= sum(row.probabilities) <= 1.01  # every class is among the four
    assert sum(r.correct for r in rows) / len(rows) == outcome.metrics.top1
    record = json.loads(store.get_bytes("runs/tiny/eval/test/metrics.json"))["predictions"]
    assert record == {"file": "predictions.jsonl", "sha256": sha256_hex(data),
                      "dataset": f"flowers102@{outcome.dataset_version}",
                      "manifest_sha256": resolve_dataset(store, "flowers102").split_sha256("test"),
                      "split": "test",
                      "weights_sha256": RunFiles(store, "tiny").read_json("best.json")["sha256"],
                      "logits": {"file": "logits.npy", "sha256": sha256_hex(store.get_bytes(
                          "runs/tiny/eval/test/logits.npy")), "shape": [24, 4],
                          "dtype": "float32", "precision": "float32"}}
    assert outcome.to_json()["predictions"] == f"{store.root}/runs/tiny/eval/test/" \
                                               "predictions.jsonl"
    assert run_predictions(store, "tiny").images == tuple(rows)


def randomised_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with running statistics and affine weights far from their initial identity,
    so that folding them is visible in the weights."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()


def test_the_inference_model_folds_batch_norms_and_computes_the_same_logits() -> None:
    from flowerml.evaluation.inference import build_inference_model
    from flowerml.models.backbones import build_model

    model = randomised_batch_norms(build_model("resnet18", 5, weights=None, seed=0))
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        folded = build_inference_model(model)
        actual = folded(images.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20  # untouched
    first_conv = next(m for m in folded.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (actual.argmax(1) == expected.argmax(1)).all()
    assert (actual - expected).abs().max().item() < 1e-4


def test_a_model_fx_cannot_trace_is_evaluated_unfolded() -> None:
    from flowerml.evaluation.inference import build_inference_model

    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if images.mean() > 2:  # control flow on a value: FX cannot trace it
                images = images * 2
            return self.norm(self.conv(images)).mean((2, 3))

    model = randomised_batch_norms(DataDependent())
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(images)
        same = build_inference_model(model)
        assert same is model and isinstance(same.norm, torch.nn.BatchNorm2d)
        assert torch.allclose(same(images), expected, atol=1e-6)
