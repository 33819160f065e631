"""int8 for CPU serving: a version's fp32 ONNX graph statically quantised, behind its own gate.

`quantize_int8` runs ONNX Runtime's static quantisation (QDQ format, per-channel int8 weights,
uint8 activations, min/max calibration) and returns `model.int8.onnx`'s bytes. Its activation
ranges come from `calibration_batches`: a fixed sample of the version's **valid** split
(`CALIBRATION_IMAGES` images evenly spaced in manifest order, so every run of the same version
calibrates on the same images, and the test split the gate measures is never seen).

The gate (`Int8Gate`) runs the int8 graph over the whole test split and compares it with the
fp32 ONNX graph's predictions on the same images: it passes when their top-1 agree on at least
`MIN_INT8_AGREEMENT` of the images and the int8 test top-1 is at most `MAX_TOP1_DROP` below the
fp32 one. A version whose int8 fails is still served (and promoted) on fp32: the `auto` runtime
only takes int8 when it passed (`flowerml.serving.runtimes`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerml.registry.export_record import INT8_ONNX_FILE

INT8_FILE = INT8_ONNX_FILE
CALIBRATION_IMAGES = 128
CALIBRATION_BATCH = 4
"""Images per calibration call. ONNX Runtime keeps every tensor of the graph for the images of
a stride, so the ranges are merged after each batch (ResNet-152 at 224 px: ~0.25 GB of tensors
an image). Its CalibMaxIntermediateOutputs option would drop data instead (onnxruntime 1.32)."""
MIN_INT8_AGREEMENT = 0.99
MAX_TOP1_DROP = 0.005
"""Largest fall of test top-1 (a fraction: 0.005 is half a point) int8 may cost."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class PixelBatches:
    """ONNX Runtime's CalibrationDataReader over uint8 NCHW batches (any iterable of arrays,
    held in memory: the sample is small), read a range at a time (`set_range`), so that the
    calibrator merges its ranges after each batch instead of keeping every tensor of all."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self.batches = [np.ascontiguousarray(batch, dtype=np.uint8) for batch in batches]
        self.images = sum(len(batch) for batch in self.batches)
        self.window: Iterator[np.ndarray] = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.window = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.window, None)
        return None if batch is None else {INPUT_NAME: batch}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def calibration_indices(images: int, wanted: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The positions (in manifest order) of the calibration sample: `wanted` evenly spaced
    images, or all of them when the split holds fewer."""
    if images <= wanted:
        return np.arange(images)
    return np.unique(np.linspace(0, images - 1, wanted).round().astype(np.int64))


def sample_batches(loader: Iterable, images: int, wanted: int = CALIBRATION_IMAGES,
                   batch: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """The calibration sample out of an in-order loader of (uint8 images, labels) over a split
    of `images` images, in batches of `batch` images."""
    chosen = set(calibration_indices(images, wanted).tolist())
    start = 0
    pending: list[np.ndarray] = []
    for pixels, _labels in loader:
        pixels = pixels.numpy() if hasattr(pixels, "numpy") else np.asarray(pixels)
        pending += [pixels[i] for i in range(len(pixels)) if start + i in chosen]
        start += len(pixels)
        while len(pending) >= batch:
            yield np.stack(pending[:batch]).astype(np.uint8)
            pending = pending[batch:]
    if pending:
        yield np.stack(pending).astype(np.uint8)


def quantize_int8(fp32: bytes, calibration: Iterable[np.ndarray]) -> tuple[bytes, int]:
    """(model.int8.onnx's bytes, images calibrated on): `fp32` statically quantised, QDQ,
    per-channel int8 weights, uint8 activations calibrated (min/max) on `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = PixelBatches(calibration)
    with tempfile.TemporaryDirectory(prefix="flowerml-int8-") as temp, quiet_advice():
        source, target = Path(temp) / "model.onnx", Path(temp) / INT8_FILE
        source.write_bytes(fp32)
        quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1})
        return target.read_bytes(), reader.images


@contextlib.contextmanager
def quiet_advice() -> Iterator[None]:
    """Without onnxruntime.quantization's root-logger advice to run its pre-processing first
    (shape inference and graph optimisation, which may fuse more before quantising; the gate
    measures what we ship either way): it would be the only stderr line of `flowerml export
    --quantize int8`, on every run."""
    def advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


@dataclass(frozen=True)
class Int8Gate:
    """The int8 graph against the fp32 one over the whole test split."""

    images: int
    top1_agreement: float
    fp32_top1: float
    int8_top1: float
    int8_images_per_second: float
    min_agreement: float = MIN_INT8_AGREEMENT
    max_top1_drop: float = MAX_TOP1_DROP

    @property
    def top1_delta(self) -> float:
        return self.int8_top1 - self.fp32_top1

    @property
    def passed(self) -> bool:
        return (self.images > 0 and self.top1_agreement >= self.min_agreement
                and self.top1_delta >= -self.max_top1_drop - 1e-12)


def measure_int8(session, batches: Iterable, fp32_predicted: np.ndarray,
                 labels: np.ndarray) -> Int8Gate:
    """Score every (uint8 images, labels) batch with the int8 `session` and compare its top-1
    with `fp32_predicted` (the fp32 graph's, same images, same order; 0-based classes)."""
    predicted: list[np.ndarray] = []
    seconds = 0.0
    for batch, _labels in batches:
        pixels = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch,
                                      dtype=np.uint8)
        start = time.perf_counter()
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        seconds += time.perf_counter() - start
        predicted.append(logits.argmax(1))
    int8 = np.concatenate(predicted) if predicted else np.zeros(0, np.int64)
    if len(int8) != len(fp32_predicted):
        raise ValueError(f"int8 scored {len(int8)} images, fp32 {len(fp32_predicted)}")
    images = len(int8)
    return Int8Gate(
        images=images,
        top1_agreement=float((int8 == fp32_predicted).mean()) if images else 0.0,
        fp32_top1=float((fp32_predicted == labels).mean()) if images else 0.0,
        int8_top1=float((int8 == labels).mean()) if images else 0.0,
        int8_images_per_second=images / seconds if seconds else 0.0)
