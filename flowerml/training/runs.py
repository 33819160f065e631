"""A training run's files on the store: `runs/<run_id>/`.

config.json (what was trained on what), checkpoint-<sha>.pt + checkpoint.json (the latest
resumable state and the pointer naming it, with its sha256), best-<sha>.safetensors + best.json
(the best-on-valid weights and their pointer), metrics.jsonl (one line per epoch), result.json
(written when training ends), eval/<split>/ (evaluation reports). Every read verifies the
recorded sha256, and checkpoints load with `torch.load(weights_only=True)`: nothing from storage
is unpickled as code. torch is imported only by the methods that handle tensors, so that
listing and describing runs stays light.

Blobs are content-addressed (`<sha256[:16]>` in the name) and never overwritten in place: a save
writes the new blob, then the pointer naming it, then deletes the other blobs of that kind. A
process killed at any point leaves the pointer naming an intact blob (the old one or the new
one) and at most one orphan, which the next save removes. Pointers written before this scheme
name `checkpoint.pt` / `best.safetensors`; readers follow whatever key the pointer names.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import Field

from flowerml.core.documents import DocumentError, Sha256, StoredDocument, plain, read_document
from flowerml.core.errors import UserError
from flowerml.core.files import json_bytes, sha256_hex
from flowerml.io.storage import ObjectNotFound, Store

if TYPE_CHECKING:
    import torch

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_JSON = "config.json"
RESULT_JSON = "result.json"

Document = TypeVar("Document", bound=StoredDocument)


class RunError(UserError):
    """A run is missing, or one of its files is corrupt or does not match."""


class DamagedRunFile(DocumentError, RunError):
    """A run's document (config.json, result.json, checkpoint.json, best.json) that does not
    read as its model."""


class BlobPointer(StoredDocument):
    """`checkpoint.json` / `best.json`: the blob it names (a plain name in the run's folder),
    its sha256 and size, and the writer's extras (`epoch`; best.json's `epoch`, `top1`...).
    Pointers from before content-addressed blobs name `checkpoint.pt` / `best.safetensors`."""

    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    sha256: Sha256
    size: int | None = None


class RecordedConfig(StoredDocument):
    """config.json's `config`: the run's `TrainConfig` as JSON. Only the fields a reader of
    the record needs are declared; the rest are kept as written (a recipe field added or
    removed since does not make an older run unreadable)."""

    arch: str
    image_size: int
    epochs: int


class RecordedDataset(StoredDocument):
    """config.json's `dataset`: the published version the run trains on."""

    name: str
    version: str
    manifest_sha256: Sha256


class RecordedObjective(StoredDocument):
    """config.json's `objective`, present when a task other than classification trained the
    run (its own fields, e.g. distillation's teacher, are the task's)."""

    kind: str
    description: str | None = None


class RunExtension(StoredDocument):
    """One entry of config.json's `extensions`: a trained run taken to more epochs."""

    epochs_before: int
    epochs: int
    at_epoch: int
    time: str


class RecordedPreprocessing(StoredDocument):
    """config.json's `preprocessing`: the pixels the model sees (`flowerml.data.preprocessing`);
    a run recorded before the field existed reads as today's values."""

    resize: int
    crop: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"


class RunRecord(StoredDocument):
    """`runs/<run_id>/config.json`: what was trained on what, written when the run starts
    (`flowerml.training.run_record`) and again when it is extended."""

    config: RecordedConfig
    objective: RecordedObjective | None = None
    dataset: RecordedDataset
    preprocessing: RecordedPreprocessing | None = None
    classes: list[str]
    torch: str
    device: str
    world_size: int = 1
    extensions: list[RunExtension] = Field(default_factory=list)


class RunResult(StoredDocument):
    """`runs/<run_id>/result.json`: what the run produced, written when training ends
    (`flowerml.training.fit`), with every epoch's row of metrics.jsonl as `history`."""

    run_id: str
    checkpoint: str
    best_valid_top1: float
    best_epoch: int
    epochs_run: int
    resumed_from_epoch: int | None
    seconds: float
    images_per_second: float
    stopped_early: bool = False
    world_size: int = 1
    history: list[dict[str, Any]] = Field(default_factory=list)


class RunNotFound(RunError):
    """No run of that id is on the store."""

    kind = "not-found"


def check_run_id(run_id: str, name: str = "--run-id") -> str:
    """`run_id`, refused naming `name` (the option or argument it came from) unless it is a
    whole store key part: letters, digits, '.', '_' or '-'."""
    if not RUN_ID.fullmatch(run_id):
        raise RunError(f"{name} must be letters, digits, '.', '_' or '-' (got {run_id!r})")
    return run_id


@dataclass(frozen=True)
class Blob:
    """One kind of verified blob: `<stem>-<sha256[:16]><suffix>`, named by `<stem>.json`.

    Content-addressed names mean a save never overwrites the bytes the current pointer names
    (the same bytes map to the same key), whatever epoch or caller wrote them."""

    stem: str
    suffix: str

    @property
    def pointer(self) -> str:
        return f"{self.stem}.json"

    def name(self, digest: str) -> str:
        return f"{self.stem}-{digest[:16]}{self.suffix}"

    def matches(self, name: str) -> bool:
        """A generation of this kind, or the fixed name used before generations."""
        return re.fullmatch(rf"{re.escape(self.stem)}(-[0-9a-f]{{16}})?{re.escape(self.suffix)}",
                            name) is not None


CHECKPOINT = Blob("checkpoint", ".pt")
BEST = Blob("best", ".safetensors")


@dataclass
class RunFiles:
    """Reads and writes one run's files, verifying checksums on every read."""

    store: Store
    run_id: str

    def key(self, name: str) -> str:
        return f"runs/{self.run_id}/{name}"

    def exists(self) -> bool:
        return self.store.exists(self.key(CONFIG_JSON))

    def write_json(self, name: str, value: object) -> None:
        self.store.put_bytes(self.key(name), json_bytes(value))

    def write(self, name: str, document: StoredDocument) -> None:
        """A document of the run, stored as `plain` JSON (only the fields it was given)."""
        self.write_json(name, plain(document))

    def read(self, name: str, model: type[Document]) -> Document:
        """The run's document `name` as `model`, validated: RunError when it is absent,
        DamagedRunFile (one line naming the key and field) when it does not read."""
        key = self.key(name)
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            raise RunError(f"run '{self.run_id}' has no {name} on {self.store.uri}") from None
        return read_document(model, raw, key, DamagedRunFile)

    def read_optional(self, name: str, model: type[Document]) -> Document | None:
        """`read`, or None when the run has no `name`."""
        return self.read(name, model) if self.store.exists(self.key(name)) else None

    def record(self) -> RunRecord:
        """config.json, validated."""
        return self.read(CONFIG_JSON, RunRecord)

    def optional_record(self) -> RunRecord | None:
        """config.json, validated, or None when the run has none."""
        return self.read_optional(CONFIG_JSON, RunRecord)

    def result(self) -> RunResult:
        """result.json, validated."""
        return self.read(RESULT_JSON, RunResult)

    def read_json(self, name: str) -> Any:
        """A JSON file of the run as it is stored, unvalidated (a run's own documents are read
        through `read`)."""
        try:
            return json.loads(self.store.get_bytes(self.key(name)))
        except ObjectNotFound:
            raise RunError(f"run '{self.run_id}' has no {name} on {self.store.uri}") from None
        except json.JSONDecodeError:
            raise RunError(f"{self.key(name)}: is not valid JSON") from None

    def _write_verified(self, kind: Blob, data: bytes, **extra: object) -> str:
        """A new blob under a key of its own, then the pointer naming it, then the blobs of that
        kind the pointer no longer names: a kill at any point leaves a pointer that names an
        intact blob. Returns the sha256."""
        digest = sha256_hex(data)
        name = kind.name(digest)
        self.store.put_bytes(self.key(name), data)
        self.write(kind.pointer, BlobPointer(key=name, sha256=digest, size=len(data), **extra))
        self._remove_other_blobs(kind, keep=name)
        return digest

    def _remove_other_blobs(self, kind: Blob, keep: str) -> None:
        """Delete every blob of `kind` but `keep`: the previous generation and any orphan a
        killed save left behind (including a pre-generation `checkpoint.pt` / `best.safetensors`)."""
        base = self.key("")
        stale = [info.key for info in self.store.list(self.key(kind.stem))
                 if kind.matches(info.key[len(base):]) and info.key != self.key(keep)]
        for key in stale:
            self.store.delete(key)

    def read_pointer(self, pointer: str) -> dict[str, Any]:
        """A pointer (checkpoint.json, best.json), validated (DamagedRunFile: one line naming
        the key and field), with the writer's extras."""
        return plain(self.read(pointer, BlobPointer))

    def _read_verified(self, pointer: str) -> tuple[bytes, dict]:
        record = self.read_pointer(pointer)
        try:
            data = self.store.get_bytes(self.key(record["key"]))
        except ObjectNotFound:
            raise RunError(f"{self.key(record['key'])}: missing (named by {pointer})") from None
        if sha256_hex(data) != record["sha256"]:
            raise RunError(f"{self.key(record['key'])}: sha256 mismatch "
                           "(the file is corrupt or truncated)")
        return data, record

    def _pointed_key(self, kind: Blob) -> str:
        return self.key(self.read_pointer(kind.pointer)["key"])

    def save_checkpoint(self, state: dict[str, Any], epoch: int) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write_verified(CHECKPOINT, buffer.getvalue(), epoch=epoch)

    def has_checkpoint(self) -> bool:
        return self.store.exists(self.key(CHECKPOINT.pointer))

    def checkpoint_key(self) -> str:
        """The store key of the latest checkpoint, as its pointer names it."""
        return self._pointed_key(CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any]:
        import torch

        data, record = self._read_verified(CHECKPOINT.pointer)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises assorted types for damaged files
            raise RunError(f"{self.key(record['key'])}: cannot be loaded "
                           f"({type(error).__name__})") from None

    def save_weights(self, tensors: dict[str, torch.Tensor], **extra: object) -> str:
        from safetensors.torch import save as save_safetensors

        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        return self._write_verified(BEST, data, **extra)

    def weights_key(self) -> str:
        """The store key of the best weights, as their pointer names it."""
        return self._pointed_key(BEST)

    def read_weights_bytes(self) -> bytes:
        """The best weights as safetensors bytes, checksum-verified."""
        return self._read_verified(BEST.pointer)[0]

    def load_weights(self) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load as load_safetensors

        data, record = self._read_verified(BEST.pointer)
        try:
            return load_safetensors(data), record
        except Exception as error:
            raise RunError(f"{self.key(record['key'])}: cannot be loaded "
                           f"({type(error).__name__})") from None

    def write_history(self, history: list[dict]) -> None:
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
        self.store.put_bytes(self.key("metrics.jsonl"), lines.encode())

    def read_history(self) -> list[dict]:
        """metrics.jsonl's rows (none before the first epoch ends); a line that is not a JSON
        object is a RunError naming the file and the line."""
        where = self.store.location(self.key("metrics.jsonl"))
        try:
            data = self.store.get_bytes(self.key("metrics.jsonl"))
        except ObjectNotFound:
            return []
        rows = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes
                raise RunError(f"{where}: line {number} is not JSON") from None
            if not isinstance(row, dict):
                raise RunError(f"{where}: line {number} is not a JSON object")
            rows.append(row)
        return rows

    def require(self) -> RunFiles:
        """This run, or RunNotFound naming the store when it has no files at all."""
        if not any(True for _ in self.store.list(self.key(""))):
            raise RunNotFound(f"run '{self.run_id}' not found on {self.store.uri}")
        return self

    def keys(self) -> list[str]:
        """Every key under `runs/<run_id>/`."""
        return [info.key for info in self.store.list(self.key(""))]

    def delete(self) -> int:
        """Remove every file of the run; returns how many there were.

        The files that make it a run go in the order that keeps what is left consistent if
        this is interrupted: result.json, then the checkpoint and best-weights pointers (what
        remains is a run that never finished an epoch: training it again starts afresh, and
        deleting it again finishes the job), then the blobs and reports, config.json last."""
        keys = self.keys()
        first = [self.key(name) for name in (RESULT_JSON, CHECKPOINT.pointer, BEST.pointer)]
        last = self.key(CONFIG_JSON)
        ordered = ([key for key in first if key in keys]
                   + [key for key in keys if key not in first and key != last]
                   + ([last] if last in keys else []))
        for key in ordered:
            self.store.delete(key)
        self.store.remove_empty_folders(self.key(""))
        return len(ordered)


def run_ids(store: Store) -> list[str]:
    """The id of every run on the store with any file under `runs/<id>/`, sorted."""
    found = {info.key.split("/")[1] for info in store.list("runs/")
             if "/" in info.key[len("runs/"):]}
    return sorted(run_id for run_id in found if RUN_ID.fullmatch(run_id))
