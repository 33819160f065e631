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
EXPORT_JSON = "export.json"


class ExportError(UserError):
    """A version that cannot be exported (uncommitted, tampered), or an export that is missing
    or does not match its recorded sha256."""


class DamagedExportRecord(DocumentError, ExportError):
    """An export.json that does not read as `ExportRecord`."""


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
    """`Parity`'s figures, whether it passed, and the test split it was measured on."""

    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    torch_images_per_second: float
    onnx_images_per_second: float
    min_agreement: float
    logit_tolerance: float
    passed: bool
    split: str
    manifest_sha256: Sha256 | None


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


def read_export(registry: Registry, version: int) -> dict[str, Any] | None:
    """A version's export.json, or None when it was never exported."""
    raw = registry.read_attachment(version, EXPORT_JSON)
    if raw is None:
        return None
    return plain(read_document(ExportRecord, raw, registry.attachment_key(version, EXPORT_JSON),
                               DamagedExportRecord))


def load_onnx_bytes(registry: Registry, version: int) -> tuple[bytes, dict[str, Any]]:
    """A version's model.onnx, verified against the sha256 its export.json records."""
    record = read_export(registry, version)
    if record is None:
        raise ExportError(f"{registry.model}:{version:06d} has no ONNX export (run: flowerml "
                          f"export {registry.model}:{version})")
    data = registry.read_attachment(version, ONNX_FILE)
    key = registry.attachment_key(version, ONNX_FILE)
    if data is None:
        raise ExportError(f"{key} is missing")
    if sha256_hex(data) != record["sha256"]:
        raise ExportError(f"{key} fails its checksum (sha256 {sha256_hex(data)}, recorded "
                          f"{record['sha256']})")
    return data, record
