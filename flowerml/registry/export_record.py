"""A registry version's ONNX export as the registry holds it: `export.json`'s document
(`ExportRecord`), reading it back, and `model.onnx` checked against it. Writing them is
`flowerml.serving.export`'s; the promotion gate and the runtimes only read them.
"""

from __future__ import annotations

from typing import Any

from flowerml.core.documents import DocumentError, Sha256, StoredDocument, plain, read_document
from flowerml.core.errors import UserError
from flowerml.core.files import sha256_hex
from flowerml.registry.versions import Registry

ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
EXPORT_JSON = "export.json"
INT8_JSON = "export.int8.json"
"""The int8 record of a version exported before it was quantised (export.json is create-only):
`read_export` shows it as export.json's `int8` block."""


class ExportError(UserError):
    """A version that cannot be exported (uncommitted, tampered), or an export that is missing
    or does not match its recorded sha256."""


class DamagedExportRecord(DocumentError, ExportError):
    """An export.json that does not read as `ExportRecord` (or an export.int8.json as
    `Int8Record`)."""


class ExportInput(StoredDocument):
    name: str
    dtype: str
    layout: str
    channels: str
    size: list[int]
    preprocessing: str


class ExportOutput(StoredDocument):
    name: str
    shape: list[str | int]
    meaning: str


class ParityRecord(StoredDocument):
    """`Parity`'s figures, whether it passed, and the test split it was measured on. Exports
    made before the evaluation kept its logits ran PyTorch again: `reference` "pytorch"."""

    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    torch_images_per_second: float | None
    onnx_images_per_second: float
    min_agreement: float
    logit_tolerance: float
    passed: bool
    split: str
    manifest_sha256: Sha256 | None
    reference: str = "pytorch"
    reference_note: str | None = None
    provider: str = "CPUExecutionProvider"
    threads: int | None = None


class Int8Calibration(StoredDocument):
    split: str
    images: int
    method: str


class Int8GateRecord(StoredDocument):
    """`flowerml.serving.quantize.Int8Gate`'s figures on the test split, and the verdict."""

    images: int
    top1_agreement: float
    fp32_top1: float
    int8_top1: float
    top1_delta: float
    int8_images_per_second: float
    min_agreement: float
    max_top1_drop: float
    passed: bool
    split: str


class Int8Record(StoredDocument):
    """export.json's `int8` block: model.int8.onnx, how it was quantised and its gate."""

    file: str
    sha256: Sha256
    bytes: int
    quant_format: str
    per_channel: bool
    weights: str
    activations: str
    calibration: Int8Calibration
    gate: Int8GateRecord
    threads: int | None
    int8_images_per_second: float
    fp32_images_per_second: float | None


class ExportRecord(StoredDocument):
    """`registry/<model>/versions/<NNNNNN>/export.json`, create-only (see the module)."""

    format: str
    file: str
    sha256: Sha256
    bytes: int
    weights_bytes: int | None
    exporter: str
    opset: int
    torch: str
    onnxruntime: str
    input: ExportInput
    output: ExportOutput
    parity: ParityRecord
    weights_sha256: Sha256
    exported_at: str
    int8: Int8Record | None = None


def read_export(registry: Registry, version: int) -> dict[str, Any] | None:
    """A version's export.json, or None when it was never exported; its `int8` block from
    export.int8.json when the version was quantised after its export."""
    raw = registry.read_attachment(version, EXPORT_JSON)
    if raw is None:
        return None
    record = plain(read_document(ExportRecord, raw, registry.attachment_key(
        version, EXPORT_JSON), DamagedExportRecord))
    if not record.get("int8"):
        later = registry.read_attachment(version, INT8_JSON)
        if later is not None:
            record["int8"] = plain(read_document(Int8Record, later, registry.attachment_key(
                version, INT8_JSON), DamagedExportRecord))
    return record


def load_onnx_bytes(registry: Registry, version: int) -> tuple[bytes, dict[str, Any]]:
    """A version's model.onnx, verified against the sha256 its export.json records."""
    record = read_export(registry, version)
    if record is None:
        raise ExportError(f"{registry.model}:{version:06d} has no ONNX export (run: flowerml "
                          f"export {registry.model}:{version})")
    return verified_attachment(registry, version, ONNX_FILE, record["sha256"]), record


def load_int8_bytes(registry: Registry, version: int) -> tuple[bytes, dict[str, Any]]:
    """A version's model.int8.onnx, verified against the sha256 export.json's `int8` records
    (the export's record is returned whole)."""
    record = read_export(registry, version)
    if record is None or not record.get("int8"):
        raise ExportError(f"{registry.model}:{version:06d} has no int8 export (run: flowerml "
                          f"export {registry.model}:{version} --quantize int8)")
    int8 = record["int8"]
    return verified_attachment(registry, version, int8["file"], int8["sha256"]), record


def verified_attachment(registry: Registry, version: int, name: str, sha256: str) -> bytes:
    """A version's attachment `name`, refused (ExportError naming its key) when missing or
    not the bytes `sha256` names."""
    key = registry.attachment_key(version, name)
    data = registry.read_attachment(version, name)
    if data is None:
        raise ExportError(f"{key} is missing")
    actual = sha256_hex(data)
    if actual != sha256:
        raise ExportError(f"{key} fails its checksum (sha256 {actual}, recorded {sha256})")
    return data
