"""Using a trained run: load its best weights and evaluate them on a split (predicting images is
`flowerml.serving.prediction`).

Evaluation writes its report next to the run (`runs/<run_id>/eval/<split>/`): report.md,
per_class.json, confusion.png, curves.png, predictions.jsonl (every image's top-5, so that two
models can be compared image by image later: `flowerml.registry.comparison`), logits.npy (every
image's full float32 logits, which the ONNX export's parity check compares its graph with, so
that PyTorch runs once over the test split) and, last, metrics.json, which names both files by
sha256 and what they were measured on, and holds the split's
histograms of top-1 probability and predicted class (the baseline scoring measures drift
against: `flowerml.evaluation.drift`).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowerml.data.loaders import build_eval_loader
from flowerml.data.manifest import PublishedDataset, resolve_dataset
from flowerml.data.preprocessing import (
    Preprocessing,
    default_preprocessing,
    recorded_preprocessing,
)
from flowerml.evaluation.drift import baseline_histograms
from flowerml.evaluation.predictions import (
    LOGITS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    EvaluationMetrics,
    ImagePrediction,
    encode_logits,
    encode_predictions,
    prediction_rows,
    predictions_record,
)
from flowerml.evaluation.report import (
    plot_confusion_matrix,
    plot_training_curves,
    render_report,
)
from flowerml.io.storage import Store
from flowerml.models.backbones import FlowerModel, build_model
from flowerml.models.distributed import select_device
from flowerml.training.loader_metrics import evaluate_loader
from flowerml.training.metrics import Metrics, per_class_rows
from flowerml.training.runs import RunError, RunFiles, RunNotFound, check_run_id
from flowerml.training.tensorboard_log import log_confusion_matrix


@dataclass
class TrainedModel:
    """Trained weights in a model (from a run or the registry), with what it needs to read
    images: `preprocessing`, what its run or card records (today's values when it records
    none)."""

    model: FlowerModel
    source: str
    class_names: tuple[str, ...]
    image_size: int
    arch: str
    weights_sha256: str
    device: torch.device
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = default_preprocessing(self.image_size)


def build_trained_model(arch: str, class_names: list[str] | tuple[str, ...], image_size: int,
                        tensors: dict[str, torch.Tensor], *, source: str, weights_sha256: str,
                        device: str = "auto",
                        preprocessing: Preprocessing | None = None) -> TrainedModel:
    """A model with the given weights loaded, on `device`, in eval mode; `preprocessing`:
    what its run or card records (None: today's values for `image_size`)."""
    model = build_model(arch, len(class_names))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise RunError(f"{source}: weights do not fit {arch} with {len(class_names)} classes "
                       f"({str(error).splitlines()[0]})") from None
    placed = select_device(device)
    return TrainedModel(model.to(placed).eval(), source, tuple(class_names), int(image_size),
                        arch, weights_sha256, placed, preprocessing)


def load_trained_model(store: Store, run_id: str, device: str = "auto") -> TrainedModel:
    """The best-on-valid weights of a run, checksum-verified (`run_id` comes from `--run`)."""
    run = RunFiles(store, check_run_id(run_id, "--run"))
    if not run.exists():
        raise RunNotFound(f"run '{run_id}' not found on {store.uri}")
    record = run.record()
    tensors, info = run.load_weights()
    return build_trained_model(record.config.arch, record.classes,
                               record.config.image_size, tensors, source=run_id,
                               weights_sha256=info["sha256"], device=device,
                               preprocessing=recorded_preprocessing(record.preprocessing,
                                                                    record.config.image_size))


def check_same_classes(trained: TrainedModel, published: PublishedDataset) -> None:
    if trained.class_names != published.class_names:
        raise RunError(f"{trained.source} has {len(trained.class_names)} classes that "
                       f"differ from {published.dataset}@{published.version}'s "
                       f"{published.num_classes}")


def eval_batch_size(device: torch.device) -> int:
    """Evaluation keeps no activations for a backward pass, so on a GPU it takes batches 4x
    the default recipe's 64 (a ResNet-152 at 224 px in fp32, as evaluation runs, needs a few
    GB for them): fewer launches per image. On a CPU a larger batch buys nothing and costs memory."""
    return 256 if device.type == "cuda" else 64


def evaluate_model(trained: TrainedModel, store: Store, published: PublishedDataset, *,
                   cache_dir: Path, split: str = "test", workers: int | None = None,
                   batch_size: int | None = None) -> Metrics:
    """Metrics of a trained model on one split of a published dataset; their `predictions`
    are in the order of `published.split_files(split)`. `batch_size`: `eval_batch_size`'s
    choice for the model's device when not given."""
    return evaluate_with_logits(trained, store, published, cache_dir=cache_dir, split=split,
                                workers=workers, batch_size=batch_size)[0]


def evaluate_with_logits(trained: TrainedModel, store: Store, published: PublishedDataset, *,
                         cache_dir: Path, split: str = "test", workers: int | None = None,
                         batch_size: int | None = None) -> tuple[Metrics, np.ndarray]:
    """`evaluate_model`'s metrics and every image's logits, float32 [images, classes] in the
    same order. Computed in full fp32 on every device (no autocast, no TF32 convolutions):
    they are the reference the ONNX graph's logits must match within 1e-3."""
    check_same_classes(trained, published)
    loader = build_eval_loader(store, published, cache_dir, split=split,
                               image_size=trained.image_size,
                               batch_size=batch_size or eval_batch_size(trained.device),
                               workers=workers, preprocessing=trained.preprocessing)
    kept: list[np.ndarray] = []

    def keep(_inputs: torch.Tensor, logits: torch.Tensor) -> None:
        kept.append(logits.float().cpu().numpy())

    with full_fp32(trained.device):
        metrics = evaluate_loader(build_inference_model(trained.model), loader, trained.device,
                                  published.class_names, amp=False, channels_last=True,
                                  observe=keep, normalisation=trained.preprocessing)
    logits = (np.concatenate(kept) if kept
              else np.zeros((0, len(published.class_names)), np.float32))
    return metrics, logits


def build_inference_model(model: nn.Module) -> nn.Module:
    """`model` for an fp32 pass over a split: a copy with each batch norm folded into the
    convolution before it (the same function; ONNX Runtime folds them the same way), in
    channels_last (oneDNN's and cuDNN's fastest fp32 convolutions). ResNet-18 on 2 CPU cores:
    186 -> 261 images/s. A model FX cannot trace is used unfolded."""
    from torch.fx.experimental.optimization import fuse

    untraceable = (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError)
    with contextlib.suppress(*untraceable):
        model = fuse(model.eval())
    return model.to(memory_format=torch.channels_last)


def full_fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """cuDNN without TF32 on a GPU (its convolutions otherwise round inputs to 10 bits)."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Evaluation:
    metrics: Metrics
    report_key: str
    dataset_version: str
    report_location: str  # the report in full: a path or an s3:// URI

    def to_json(self) -> dict[str, Any]:
        return {**self.metrics.summary(), "report": self.report_location,
                "predictions": self.report_location.rsplit("/", 1)[0] + "/" + PREDICTIONS_FILE,
                "dataset_version": self.dataset_version}


def evaluate_run(store: Store, run_id: str, *, cache_dir: Path, split: str = "test",
                 version: str | None = None, device: str = "auto", workers: int | None = None,
                 batch_size: int | None = None) -> Evaluation:
    """Evaluate a run's best weights on a split and publish the report next to the run."""
    trained = load_trained_model(store, run_id, device)
    dataset = RunFiles(store, run_id).record().dataset
    published = resolve_dataset(store, dataset.name, version or dataset.version)
    metrics, logits = evaluate_with_logits(trained, store, published, cache_dir=cache_dir,
                                           split=split, workers=workers, batch_size=batch_size)
    report_key = publish_report(store, trained, published, split, metrics, logits)
    return Evaluation(metrics, report_key, published.version, store.location(report_key))


def publish_report(store: Store, trained: TrainedModel, published: PublishedDataset, split: str,
                   metrics: Metrics, logits: np.ndarray | None = None) -> str:
    """Write report.md, its plots, the per-image predictions (and `logits`, when given) and the
    metrics (last) under runs/<run_id>/eval/<split>/."""
    run = RunFiles(store, trained.source)
    prefix = f"eval/{split}"
    history = run.read_history()
    with tempfile.TemporaryDirectory() as temp:
        plots = {"Confusion matrix (row-normalised)":
                 plot_confusion_matrix(metrics, Path(temp) / "confusion.png")}
        if history:
            plots["Training curves"] = plot_training_curves(history, Path(temp) / "curves.png")
        for path in plots.values():
            store.put_file(run.key(f"{prefix}/{path.name}"), path)
        log_confusion_matrix(run, split, plots["Confusion matrix (row-normalised)"])
    context = {"run": trained.source, "dataset": f"{published.dataset}@{published.version}",
               "split": split, "arch": trained.arch,
               "weights sha256": trained.weights_sha256[:16]}
    report = render_report(metrics, title=f"{published.dataset} {split}: run {trained.source}",
                           context=context, plots={k: v.name for k, v in plots.items()},
                           synthetic=published.synthetic)
    rows = split_predictions(metrics, published, split)
    predictions = encode_predictions(rows)
    store.put_bytes(run.key(f"{prefix}/{PREDICTIONS_FILE}"), predictions)
    kept = None if logits is None else encode_logits(logits)
    if kept is not None:
        store.put_bytes(run.key(f"{prefix}/{LOGITS_FILE}"), kept)
    run.write_json(f"{prefix}/per_class.json", per_class_rows(metrics))
    store.put_bytes(run.key(f"{prefix}/report.md"), report.encode())
    # Last: metrics.json says the evaluation is complete and names the predictions beside it.
    record = predictions_record(predictions, dataset=f"{published.dataset}@{published.version}",
                                manifest_sha256=published.split_sha256(split), split=split,
                                weights_sha256=trained.weights_sha256, logits=kept,
                                logits_shape=() if logits is None else logits.shape)
    baseline = baseline_histograms(rows, len(published.class_names))
    run.write(f"{prefix}/{METRICS_FILE}", EvaluationMetrics(**metrics.summary(),
                                                          predictions=record, baseline=baseline))
    return run.key(f"{prefix}/report.md")


def split_predictions(metrics: Metrics, published: PublishedDataset,
                      split: str) -> list[ImagePrediction]:
    """predictions.jsonl's rows: every image of the split, keyed as in the manifest."""
    if metrics.predictions is None:
        raise ValueError("these metrics carry no per-image predictions to store")
    keys = [entry.key for entry in published.split_files(split)]
    return prediction_rows(keys, metrics.predictions)
