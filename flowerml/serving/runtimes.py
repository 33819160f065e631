"""A model ready to score pixels, run by PyTorch or by ONNX Runtime behind one contract.

A `Scorer` takes what the ONNX export takes (`flowerml.serving.export`): uint8 RGB pixels, NCHW, at
its `image_size`, resized and centre-cropped by its recorded `preprocessing`, and returns logits. Both
`flowerml predict` and `flowerml score` run models through it, so the two runtimes are
interchangeable wherever a model is used. `choose_runtime` picks and verifies the file a
runtime will run (model.onnx against export.json, the weights against COMMITTED).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flowerml.core.errors import UserError
from flowerml.data.preprocessing import Preprocessing, recorded_preprocessing
from flowerml.registry.versions import Registry

if TYPE_CHECKING:
    from flowerml.evaluation.inference import TrainedModel

RUNTIMES = ("auto", "onnx", "onnx-int8", "torch")
ONNX_RUNTIMES = ("onnx", "onnx-int8")
"""The runtimes ONNX Runtime runs, on the CPU."""


class RuntimeRefused(UserError):
    """A runtime the model cannot run: no ONNX export, a failed parity, a different file."""


@dataclass
class Scorer:
    """A loaded model: uint8 NCHW pixels -> logits, with the names of its classes and the
    preprocessing its card records (today's values for `image_size` when none is given)."""

    label: str
    runtime: str
    sha256: str
    image_size: int
    class_names: tuple[str, ...]
    logits: Callable[[np.ndarray], np.ndarray]
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = recorded_preprocessing(None, self.image_size)


def auto_runtime(record: dict | None) -> str:
    """What `auto` runs on a CPU: the int8 graph when it passed its gate (and the fp32 export
    its parity), else the fp32 ONNX graph when it passed parity, else PyTorch."""
    if not (record and record.get("parity", {}).get("passed")):
        return "torch"
    int8 = record.get("int8")
    return "onnx-int8" if int8 and int8["gate"]["passed"] else "onnx"


def choose_runtime(registry: Registry, version: int, requested: str) -> tuple[str, str]:
    """(runtime, sha256 of the file it runs), that file verified now, so that a bad one is
    refused before any work. `auto` (on a CPU) is `auto_runtime`'s choice."""
    from flowerml.registry.export_record import load_int8_bytes, load_onnx_bytes, read_export

    if requested not in RUNTIMES:
        raise RuntimeRefused(f"--runtime must be one of {', '.join(RUNTIMES)}: got "
                             f"{requested!r}")
    label = f"{registry.model}:{version:06d}"
    record = read_export(registry, version)
    passed = bool(record and record.get("parity", {}).get("passed"))
    runtime = auto_runtime(record) if requested == "auto" else requested
    if runtime == "onnx-int8":
        int8 = (record or {}).get("int8")
        if not int8:
            raise RuntimeRefused(f"{label} has no int8 export (run: flowerml export "
                                 f"{registry.model}:{version} --quantize int8, or use "
                                 "--runtime onnx)")
        if not (passed and int8["gate"]["passed"]):
            raise RuntimeRefused(f"{label}'s int8 export failed its gate against fp32 (see "
                                 "export.json): use --runtime onnx")
        _, record = load_int8_bytes(registry, version)  # verifies its sha256
        return "onnx-int8", record["int8"]["sha256"]
    if runtime == "onnx":
        if record is None:
            raise RuntimeRefused(f"{label} has no ONNX export (run: flowerml export "
                                 f"{registry.model}:{version}, or use --runtime torch)")
        if not passed:
            raise RuntimeRefused(f"{label}'s ONNX export failed its parity check against "
                                 f"PyTorch: use --runtime torch")
        _, record = load_onnx_bytes(registry, version)  # verifies its sha256
        return "onnx", record["sha256"]
    registry.verify(version)
    return "torch", registry.get(version).weights_sha256


def load_scorer(registry: Registry, version: int, runtime: str, sha256: str | None = None,
                threads: int | None = None, device: str = "cpu") -> Scorer:
    """A registry version ready to score (ONNX Runtime runs on the CPU; PyTorch on `device`);
    `sha256`, when given, must be the file's."""
    card = registry.require_committed(version).card
    names = tuple(c["name"] for c in card["classes"])
    label = f"{registry.model}:{version:06d}"
    if runtime in ONNX_RUNTIMES:
        from flowerml.registry.export_record import load_int8_bytes, load_onnx_bytes
        from flowerml.serving.export import build_onnx_session

        if runtime == "onnx":
            data, record = load_onnx_bytes(registry, version)
            file, file_sha256 = record["file"], record["sha256"]
        else:
            data, record = load_int8_bytes(registry, version)
            file, file_sha256 = record["int8"]["file"], record["int8"]["sha256"]
        check_same_file(label, file, file_sha256, sha256)
        session = build_onnx_session(data, threads)
        del data
        size = int(record["input"]["size"][0])
        return Scorer(label, runtime, file_sha256, size, names,
                      lambda pixels: session.run(["logits"], {"images": pixels})[0],
                      recorded_preprocessing(card.get("preprocessing"), size))
    import torch

    from flowerml.registry.release import load_version

    if threads:
        torch.set_num_threads(threads)
    trained = load_version(registry, version, device=device)  # verifies the weights' sha256
    check_same_file(label, "model.safetensors", trained.weights_sha256, sha256)
    return scorer_from_model(trained, label=label)


def scorer_from_model(trained: TrainedModel, label: str | None = None) -> Scorer:
    """A model already loaded (a run's best weights, a registry version) as a PyTorch scorer on
    its device."""
    import torch

    from flowerml.serving.export import PixelsToLogits

    wrapped = PixelsToLogits(trained.model, trained.preprocessing).to(trained.device).eval()

    def logits(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(trained.device)
            return wrapped(batch).float().cpu().numpy()

    return Scorer(label or trained.source, "torch", trained.weights_sha256, trained.image_size,
                  trained.class_names, logits, trained.preprocessing)


def check_same_file(label: str, name: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise RuntimeRefused(f"{label}'s {name} has sha256 {actual}, but this run planned "
                             f"{expected}")


def softmax_top_k(scorer: Scorer, pixels: np.ndarray, top_k: int
                  ) -> list[tuple[list[int], list[float]]]:
    """For each image: its top-k class indices (0-based) and their probabilities."""
    logits = scorer.logits(pixels).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [([int(i) for i in row], [float(p) for p in probabilities[n, row]])
            for n, row in enumerate(order)]
