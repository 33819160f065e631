"""Evaluate and predict with a trained run, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from flowerml.cli import cli
from flowerml.inference import evaluate_run, load_trained_model, predict_images
from flowerml.ingest import FetchOptions, ingest
from flowerml.recipes import build_config
from flowerml.storage import LocalStore
from flowerml.synthetic import SyntheticSpec, write_synthetic_archive
from flowerml.training import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path, Path]:
    """A store with a published dataset and a 2-epoch run 'tiny'; and the source folder."""
    root = tmp_path_factory.mktemp("inference")
    write_synthetic_archive(root / "src", SyntheticSpec(classes=4, per_class=12, image_size=56,
                                                        seed=5))
    store = LocalStore(root / "store")
    ingest(str(root / "src"), store, "flowers102", root / "cache", FetchOptions())
    config = build_config("demo", epochs=2, image_size=48, batch_size=8)
    fit(config, store=store, dataset="flowers102", run_id="tiny", cache_dir=root / "cache",
        device="cpu", workers=0)
    return store, root / "cache", root / "src"


def invoke(store: LocalStore, cache: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"FLOWERML_STORE": str(store.root),
                                                    "FLOWERML_CACHE_DIR": str(cache)})


def test_evaluate_publishes_report_and_plots(trained) -> None:
    store, cache, _ = trained
    outcome = evaluate_run(store, "tiny", cache_dir=cache, device="cpu", workers=0)
    summary = outcome.metrics.summary()
    assert summary["n"] == 24  # the test split: 6 per class
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 1.0
    keys = {info.key for info in store.list("runs/tiny/eval/test/")}
    assert {f"runs/tiny/eval/test/{n}" for n in ("report.md", "metrics.json", "per_class.json",
                                                  "confusion.png", "curves.png")} <= keys
    report = store.get_bytes(outcome.report_key).decode()
    assert "pink primrose" in report and "confusion.png" in report


def test_evaluate_cli_json(trained) -> None:
    store, cache, _ = trained
    result = invoke(store, cache, "evaluate", "--run", "tiny", "--device", "cpu", "--workers",
                    "0", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"top1", "top5", "mean_class_accuracy", "loss", "n", "report"} <= set(summary)
    assert summary["report"] == "runs/tiny/eval/test/report.md"


def test_predict_top_k(trained) -> None:
    store, cache, source = trained
    image = next((cache / "flowers102").rglob("test/*/*.jpg"))
    model = load_trained_model(store, "tiny", "cpu")
    [prediction] = predict_images(model, [image], top_k=3)
    probabilities = [p["probability"] for p in prediction["predictions"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0001
    assert prediction["predictions"][0]["name"] in model.class_names
    result = invoke(store, cache, "predict", str(image), "--run", "tiny", "--device", "cpu",
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["image"] == str(image)


def assert_refused(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_predict_bad_inputs(trained, tmp_path: Path) -> None:
    store, cache, _ = trained
    assert_refused(invoke(store, cache, "predict", str(tmp_path / "none.jpg"), "--run", "tiny"),
                   "none.jpg: no such image")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert_refused(invoke(store, cache, "predict", str(text), "--run", "tiny"),
                   "notes.jpg: not a readable image")
    assert_refused(invoke(store, cache, "predict", str(text), "--run", "nope"),
                   "run 'nope' not found")


def test_altered_image_on_store_is_refused(trained, tmp_path: Path) -> None:
    store, _, _ = trained
    current = json.loads(store.get_bytes("datasets/flowers102/CURRENT"))
    manifest = json.loads(store.get_bytes(f"datasets/flowers102/{current['version']}/"
                                          "manifest.json"))
    entry = next(e for e in manifest["files"] if e["split"] == "test")
    key = f"datasets/flowers102/{current['version']}/{entry['key']}"
    original = store.get_bytes(key)
    store.put_bytes(key, original[:-10] + b"0123456789")
    try:
        result = invoke(store, tmp_path / "fresh-cache", "evaluate", "--run", "tiny",
                        "--device", "cpu", "--workers", "0")
        assert_refused(result, f"{entry['key']}: sha256 mismatch")
    finally:
        store.put_bytes(key, original)


def test_tampered_weights_are_refused(trained) -> None:
    store, cache, _ = trained
    key = "runs/tiny/best.safetensors"
    original = store.get_bytes(key)
    store.put_bytes(key, original[:-4] + b"\x00\x00\x00\x01")
    try:
        assert_refused(invoke(store, cache, "evaluate", "--run", "tiny", "--device", "cpu"),
                       "runs/tiny/best.safetensors: sha256 mismatch")
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
def test_train_bad_options(trained, args: list[str], message: str) -> None:
    store, cache, _ = trained
    assert_refused(invoke(store, cache, "train", "--recipe", "demo", "--device", "cpu", *args)
                   if "--recipe" not in args else invoke(store, cache, "train", *args),
                   message)


def test_train_cli_json(trained) -> None:
    store, cache, _ = trained
    result = invoke(store, cache, "train", "--recipe", "demo", "--epochs", "1",
                    "--image-size", "40", "--device", "cpu", "--workers", "0",
                    "--run-id", "cli-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"run_id", "checkpoint", "best_valid_top1", "epochs_run", "resumed_from_epoch",
            "seconds", "images_per_second"} <= set(summary)
    assert summary["run_id"] == "cli-run" and summary["epochs_run"] == 1
