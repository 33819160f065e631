"""ONNX export of a registry version, with a parity gate measured on the version's own test split.

`export_version` writes two files into `registry/<model>/versions/<NNNNNN>/`, create-only:
`model.onnx` (the graph) and `export.json` (its sha256, sizes, exporter, opset, input contract
and the parity figures). A version holds one export for good: exporting it again returns the
one it has.

The graph takes what the evaluation loader produces, **uint8 RGB images, NCHW, already resized
and centre-cropped to the card's `image_size`** by the card's `preprocessing` (its weights' own:
e.g. resize the short side to 232, then centre-crop 224; without one, round(S*256/224) then S),
and normalises them inside (the preprocessing's mean and std): a consumer sends pixels, not
floats it has to normalise the same way. Its batch axis is dynamic; the output is `logits`
[N, classes] (softmax them for probabilities).

Parity is measured, not assumed: ONNX Runtime's CPU provider and PyTorch eager score every test
image of the manifest the card names; the export passes when their top-1 predictions agree on at
least `MIN_AGREEMENT` of the images and no logit differs by more than `LOGIT_TOLERANCE`. A version
whose export fails parity cannot be promoted without `--force` (see `flowerml.registry.gates`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowerml.core.documents import check_document, plain
from flowerml.core.files import sha256_hex
from flowerml.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flowerml.registry.export_record import (
    EXPORT_JSON,
    ONNX_FILE,
    ExportError,
    ExportRecord,
    load_onnx_bytes,
    read_export,
)
from flowerml.registry.versions import Registry
from flowerml.serving.export_summary import show_on_card
from flowerml.serving.quantize import (
    INT8_FILE,
    Int8Gate,
    measure_int8,
    quantize_int8,
    sample_batches,
)
from flowerml.serving.stored_logits import stored_logits

DEFAULT_OPSET = 18
MIN_AGREEMENT = 0.999
LOGIT_TOLERANCE = 1e-3
"""Largest |logit(onnx) - logit(torch)| allowed. Both run fp32 on the CPU; what differs is the
order of the sums in their kernels, which moves a logit by ~1e-5 in ResNet-152."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class PixelsToLogits(nn.Module):
    """uint8 NCHW pixels -> logits: the model behind the same normalisation as training's
    (`preprocessing`'s mean and std; default: ImageNet's)."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None) -> None:
        super().__init__()
        self.model = model
        mean, std = ((preprocessing.mean, preprocessing.std) if preprocessing is not None
                     else (IMAGENET_MEAN, IMAGENET_STD))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch's logits on the same images: the evaluation's stored ones
    (`reference` "evaluation-logits": PyTorch did not run again, `torch_images_per_second` is
    None) or PyTorch eager run here ("pytorch"; `reference_note` says why)."""

    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    torch_images_per_second: float | None
    onnx_images_per_second: float
    min_agreement: float = MIN_AGREEMENT
    logit_tolerance: float = LOGIT_TOLERANCE
    reference: str = "pytorch"
    reference_note: str | None = None
    provider: str = CPU_PROVIDER
    threads: int | None = None

    @property
    def passed(self) -> bool:
        return (self.images > 0 and self.top1_agreement >= self.min_agreement
                and self.max_abs_logit_diff <= self.logit_tolerance)


def export_onnx(model: nn.Module, image_size: int, path: Path,
                opset: int = DEFAULT_OPSET, preprocessing: Preprocessing | None = None) -> str:
    """Write `model` (uint8 pixels in, normalised by `preprocessing`) as ONNX at `path`,
    checked by onnx's checker; returns the exporter used: torch.export ("dynamo") where it
    works, else TorchScript."""
    import onnx

    wrapped = PixelsToLogits(model, preprocessing).eval()
    example = (torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8),)
    try:
        exporter = "dynamo"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, example, str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=False, verbose=False)
    except Exception:  # noqa: BLE001 - any dynamo failure falls back to the older exporter
        exporter = "torchscript"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, example, str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    onnx.checker.check_model(str(path), full_check=True)
    return exporter


def build_onnx_session(data: bytes, threads: int | None = None,
                       providers: tuple[str, ...] = (CPU_PROVIDER,)):
    """An ONNX Runtime session over a model's bytes, on the CPU by default, with `threads`
    intra-op threads (by default as many as torch uses, so OMP_NUM_THREADS bounds both runtimes
    alike and a benchmark compares them on the same cores). CUDA runs without TF32, so that
    its logits stay fp32's."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    chosen = [(name, {"use_tf32": 0}) if name == CUDA_PROVIDER else name for name in providers]
    return onnxruntime.InferenceSession(data, options, providers=chosen)


def parity_providers(available: list[str] | None = None,
                     cuda: bool | None = None) -> tuple[str, ...]:
    """Where the parity check runs: CUDA when a GPU is present and onnxruntime-gpu offers its
    provider (`available`, `cuda`: what ONNX Runtime and torch report, by default), else the
    CPU."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if cuda is None:
        cuda = torch.cuda.is_available()
    return (CUDA_PROVIDER, CPU_PROVIDER) if cuda and CUDA_PROVIDER in available \
        else (CPU_PROVIDER,)


def every_core() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, not the
    host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parity_session(data: bytes):
    """The parity check's session: on CUDA where `parity_providers` finds it, else on every
    CPU core (the check runs alone: nothing else needs the cores meanwhile)."""
    return build_onnx_session(data, threads=every_core(), providers=parity_providers())


@dataclass(frozen=True)
class TestScores:
    """The ONNX graph's top-1 (0-based) and the true class of every image the parity check
    scored, in order: what the int8 gate compares with."""

    predicted: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def measure_parity(model: nn.Module, session, batches,
                   preprocessing: Preprocessing | None = None) -> Parity:
    """Score every (uint8 images, labels) batch with both runtimes and compare (the two-pass
    check, for a version whose evaluation kept no logits)."""
    return compare_runtimes(session, batches, model=model, preprocessing=preprocessing)[0]


@torch.no_grad()
def compare_runtimes(session, batches, *, model: nn.Module | None = None,
                     preprocessing: Preprocessing | None = None,
                     stored: np.ndarray | None = None, reference_note: str | None = None
                     ) -> tuple[Parity, TestScores]:
    """ONNX Runtime over every (uint8 images, labels) batch, compared with the `stored` logits
    of the same images in the same order (PyTorch does not run), or with `model` run here."""
    wrapped = PixelsToLogits(model, preprocessing).eval() if stored is None else None
    images = agree = 0
    max_diff = 0.0
    torch_seconds = onnx_seconds = 0.0
    predicted: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch, targets in batches:
        pixels = batch.to(torch.uint8).contiguous()
        if wrapped is not None:
            start = time.perf_counter()
            expected = wrapped(pixels).float().numpy()
            torch_seconds += time.perf_counter() - start
        else:
            expected = stored[images:images + len(pixels)]
            if len(expected) != len(pixels):
                raise ExportError(f"the evaluation's logits hold {len(stored)} images, fewer "
                                  "than the test split")
        start = time.perf_counter()
        actual = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
        onnx_seconds += time.perf_counter() - start
        images += len(pixels)
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(expected - actual).max()))
        predicted.append(actual.argmax(1))
        if targets is not None:
            labels.append(np.asarray(targets))
    if stored is not None and images != len(stored):
        raise ExportError(f"the evaluation's logits hold {len(stored)} images, the test split "
                          f"{images}")
    parity = Parity(
        images=images, top1_agreement=agree / images if images else 0.0,
        max_abs_logit_diff=max_diff,
        torch_images_per_second=(images / torch_seconds if torch_seconds else 0.0)
        if stored is None else None,
        onnx_images_per_second=images / onnx_seconds if onnx_seconds else 0.0,
        reference="pytorch" if stored is None else "evaluation-logits",
        reference_note=reference_note, provider=session.get_providers()[0],
        threads=session.get_session_options().intra_op_num_threads)
    return parity, TestScores(np.concatenate(predicted) if predicted else np.zeros(0, np.int64),
                              np.concatenate(labels) if labels else np.zeros(0, np.int64))


@dataclass(frozen=True)
class Export:
    """What `export_version` did: the record in export.json, and whether it was new."""

    record: dict[str, Any]
    created: bool

    @property
    def passed(self) -> bool:
        return bool(self.record.get("parity", {}).get("passed"))

    @property
    def int8_passed(self) -> bool | None:
        """Whether its int8 graph passed its gate; None when none was made."""
        return int8_passed(self.record)


def int8_passed(record: dict[str, Any]) -> bool | None:
    int8 = record.get("int8")
    return None if not int8 else bool(int8["gate"]["passed"])


QUANTIZE = ("none", "int8")


def export_version(registry: Registry, version: int, *, cache_dir: Path,
                   opset: int = DEFAULT_OPSET, workers: int | None = None,
                   batch_size: int = 32, quantize: str = "none") -> Export:
    """Export a committed version to ONNX, measure parity on its test split (against the
    logits its evaluation kept; PyTorch runs again only for a version evaluated before they
    were kept) and, with `quantize="int8"`, quantise it and gate the int8 graph; attach
    model.onnx (and model.int8.onnx), then export.json, create-only. Idempotent: an intact
    export is returned."""
    from flowerml.registry.release import load_version

    if quantize not in QUANTIZE:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE)}: got {quantize!r}")
    existing = read_export(registry, version)
    if existing is not None:
        load_onnx_bytes(registry, version)  # an export on the store is reused only if intact
        if quantize == "int8" and not existing.get("int8"):
            return quantize_exported(registry, version, existing, cache_dir, workers,
                                     batch_size)
        return Export(existing, created=False)
    trained = load_version(registry, version, device="cpu")  # verifies the weights' sha256
    card = registry.get(version).card
    with tempfile.TemporaryDirectory(prefix="flowerml-export-") as temp:
        path = Path(temp) / ONNX_FILE
        exporter = export_onnx(trained.model, trained.image_size, path, opset,
                               trained.preprocessing)
        data = path.read_bytes()
    if not registry.attach(version, ONNX_FILE, data):
        # A concurrent export got there first: measure and record the file the version holds.
        data = registry.read_attachment(version, ONNX_FILE) or data
    batches = test_batches(registry.store, card, cache_dir, trained.image_size, workers,
                           batch_size, trained.preprocessing)
    stored, note = stored_logits(registry, version, weights_sha256=trained.weights_sha256,
                                 card=card, test_images=len(batches.dataset))
    parity, scores = compare_runtimes(parity_session(data), batches, model=trained.model,
                                      preprocessing=trained.preprocessing, stored=stored,
                                      reference_note=note)
    record = export_record(data, exporter, opset, trained, parity, card,
                           weights_size(registry, version))
    if quantize == "int8":
        calibration = calibration_batches(registry.store, card, cache_dir, trained, workers,
                                          batch_size)
        record["int8"] = export_int8(registry, version, data, calibration, batches, scores,
                                     parity.onnx_images_per_second
                                     if parity.provider == CPU_PROVIDER else None)
    record = plain(check_document(ExportRecord, record, registry.attachment_key(
        version, EXPORT_JSON), ExportError))
    created = registry.attach(version, EXPORT_JSON, json.dumps(record, indent=2,
                                                               sort_keys=True).encode())
    if not created:  # a concurrent export recorded first: keep its record
        return Export(read_export(registry, version) or record, created=False)
    show_on_card(registry, version, record)
    return Export(record, created=True)


def test_batches(store, card: dict[str, Any], cache_dir: Path, image_size: int,
                 workers: int | None, batch_size: int,
                 preprocessing: Preprocessing | None = None):
    """The version's own test split (the manifest its card names) as uint8 batches, decoded
    by the model's `preprocessing`."""
    from flowerml.data.loaders import build_eval_loader
    from flowerml.data.manifest import resolve_dataset

    lineage = card.get("lineage", {})
    published = resolve_dataset(store, lineage["dataset"], lineage["dataset_version"])
    return build_eval_loader(store, published, cache_dir, split="test", image_size=image_size,
                             batch_size=batch_size, workers=workers,
                             preprocessing=preprocessing)


def quantize_exported(registry: Registry, version: int, existing: dict[str, Any],
                      cache_dir: Path, workers: int | None, batch_size: int) -> Export:
    """int8 for a version exported without it: its verified model.onnx scored by ONNX Runtime
    on the test split (the fp32 predictions the gate compares with), quantised and gated;
    model.int8.onnx, then export.int8.json (export.json is create-only), which `read_export`
    shows as the record's `int8` block."""
    from flowerml.registry.export_record import INT8_JSON, Int8Record
    from flowerml.registry.release import load_version

    data, _ = load_onnx_bytes(registry, version)
    trained = load_version(registry, version, device="cpu")  # the preprocessing, verified
    card = registry.get(version).card
    batches = test_batches(registry.store, card, cache_dir, trained.image_size, workers,
                           batch_size, trained.preprocessing)
    scores, speed = score_onnx(build_onnx_session(data, threads=every_core()), batches)
    calibration = calibration_batches(registry.store, card, cache_dir, trained, workers,
                                      batch_size)
    int8 = export_int8(registry, version, data, calibration, batches, scores, speed)
    key = registry.attachment_key(version, INT8_JSON)
    int8 = plain(check_document(Int8Record, int8, key, ExportError))
    if not registry.attach(version, INT8_JSON, json.dumps(int8, indent=2,
                                                          sort_keys=True).encode()):
        return Export(read_export(registry, version) or existing, created=False)
    record = {**existing, "int8": int8}
    show_on_card(registry, version, record)
    return Export(record, created=True)


def score_onnx(session, batches) -> tuple[TestScores, float]:
    """ONNX Runtime's top-1 and the labels over every batch, and its images/s."""
    predicted: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    seconds = 0.0
    for batch, targets in batches:
        start = time.perf_counter()
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch.to(torch.uint8).numpy()})[0]
        seconds += time.perf_counter() - start
        predicted.append(logits.argmax(1))
        labels.append(np.asarray(targets))
    images = sum(len(p) for p in predicted)
    return (TestScores(np.concatenate(predicted), np.concatenate(labels)),
            images / seconds if seconds else 0.0)


def calibration_batches(store, card: dict[str, Any], cache_dir: Path, trained,
                        workers: int | None, batch_size: int):
    """The int8 calibration sample: `CALIBRATION_IMAGES` evenly spaced images of the version's
    valid split, decoded as its test split is."""
    from flowerml.data.loaders import build_eval_loader
    from flowerml.data.manifest import resolve_dataset

    lineage = card.get("lineage", {})
    published = resolve_dataset(store, lineage["dataset"], lineage["dataset_version"])
    loader = build_eval_loader(store, published, cache_dir, split="valid",
                               image_size=trained.image_size, batch_size=batch_size,
                               workers=workers, preprocessing=trained.preprocessing)
    return sample_batches(loader, len(loader.dataset))


def export_int8(registry: Registry, version: int, fp32: bytes, calibration, batches,
                scores: TestScores, fp32_speed: float | None) -> dict[str, Any]:
    """Quantise `fp32` on `calibration`, attach model.int8.onnx (create-only: a file an
    interrupted export left is the one measured), gate it on the test split against the fp32
    graph's `scores`: export.json's `int8` block (`fp32_speed`: the fp32 graph's images/s on
    the CPU, None when it ran elsewhere)."""
    data, calibrated = quantize_int8(fp32, calibration)
    if not registry.attach(version, INT8_FILE, data):
        data = registry.read_attachment(version, INT8_FILE) or data
    threads = every_core()
    gate = measure_int8(build_onnx_session(data, threads=threads), batches, scores.predicted,
                        scores.labels)
    return int8_record(data, calibrated, gate, threads, fp32_speed)


def int8_record(data: bytes, calibrated: int, gate: Int8Gate, threads: int | None,
                fp32_speed: float | None) -> dict[str, Any]:
    return {"file": INT8_FILE, "sha256": sha256_hex(data), "bytes": len(data),
            "quant_format": "QDQ", "per_channel": True, "weights": "int8",
            "activations": "uint8",
            "calibration": {"split": "valid", "images": calibrated, "method": "minmax"},
            "gate": {**asdict(gate), "top1_delta": gate.top1_delta, "passed": gate.passed,
                     "split": "test"},
            "threads": threads, "int8_images_per_second": gate.int8_images_per_second,
            "fp32_images_per_second": fp32_speed}


def export_record(data: bytes, exporter: str, opset: int, trained, parity: Parity,
                  card: dict[str, Any], weights_bytes: int | None) -> dict[str, Any]:
    """export.json: the file, how it was made, its input contract and its parity."""
    size = trained.image_size
    return {
        "format": "onnx", "file": ONNX_FILE, "sha256": sha256_hex(data), "bytes": len(data),
        "weights_bytes": weights_bytes, "exporter": exporter, "opset": opset,
        "torch": torch.__version__, "onnxruntime": onnxruntime_version(),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "size": [size, size],
                  "preprocessing": trained.preprocessing.describe()},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(trained.class_names)],
                   "meaning": "logits; softmax for probabilities; index i is label i + 1"},
        "parity": {**asdict(parity), "passed": parity.passed, "split": "test",
                   "manifest_sha256": card.get("test_manifest_sha256")},
        "weights_sha256": trained.weights_sha256,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def weights_size(registry: Registry, version: int) -> int | None:
    for info in registry.store.list(registry.attachment_key(version, "model.safetensors")):
        return info.size
    return None


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
