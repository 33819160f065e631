"""A training run's files on the store: `runs/<run_id>/`.

config.json (what was trained on what), checkpoint.pt + checkpoint.json (the latest resumable
state and its sha256, the pointer written after the checkpoint), best.safetensors +
best.json (the best-on-valid weights and their sha256), metrics.jsonl (one line per epoch),
result.json (written when training ends). Every read verifies the recorded sha256, and
checkpoints load with `torch.load(weights_only=True)`: nothing from storage is unpickled as code.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from flowerml.errors import UserError
from flowerml.files import json_bytes, sha256_hex
from flowerml.storage import ObjectNotFound, Store

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(UserError):
    """A run is missing, or one of its files is corrupt or does not match."""


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise RunError(f"--run-id must be letters, digits, '.', '_' or '-' (got {run_id!r})")
    return run_id


@dataclass
class RunFiles:
    """Reads and writes one run's files, verifying checksums on every read."""

    store: Store
    run_id: str

    def key(self, name: str) -> str:
        return f"runs/{self.run_id}/{name}"

    def exists(self) -> bool:
        return self.store.exists(self.key("config.json"))

    def write_json(self, name: str, value: object) -> None:
        self.store.put_bytes(self.key(name), json_bytes(value))

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.store.get_bytes(self.key(name)))
        except ObjectNotFound:
            raise RunError(f"run '{self.run_id}' has no {name} on {self.store.uri}") from None
        except json.JSONDecodeError:
            raise RunError(f"{self.key(name)}: is not valid JSON") from None

    def _write_verified(self, name: str, data: bytes, pointer: str, **extra: object) -> None:
        """The blob first, then its pointer with the sha256: a reader never sees a torn pair."""
        self.store.put_bytes(self.key(name), data)
        self.write_json(pointer, {"key": name, "sha256": sha256_hex(data), "size": len(data),
                                  **extra})

    def _read_verified(self, pointer: str) -> tuple[bytes, dict]:
        record = self.read_json(pointer)
        try:
            data = self.store.get_bytes(self.key(record["key"]))
        except ObjectNotFound:
            raise RunError(f"{self.key(record['key'])}: missing (named by {pointer})") from None
        if sha256_hex(data) != record["sha256"]:
            raise RunError(f"{self.key(record['key'])}: sha256 mismatch "
                           "(the file is corrupt or truncated)")
        return data, record

    def save_checkpoint(self, state: dict[str, Any], epoch: int) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write_verified("checkpoint.pt", buffer.getvalue(), "checkpoint.json", epoch=epoch)

    def has_checkpoint(self) -> bool:
        return self.store.exists(self.key("checkpoint.json"))

    def load_checkpoint(self) -> dict[str, Any]:
        data, _ = self._read_verified("checkpoint.json")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises assorted types for damaged files
            raise RunError(f"{self.key('checkpoint.pt')}: cannot be loaded "
                           f"({type(error).__name__})") from None

    def save_weights(self, tensors: dict[str, torch.Tensor], **extra: object) -> str:
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self._write_verified("best.safetensors", data, "best.json", **extra)
        return sha256_hex(data)

    def read_weights_bytes(self) -> bytes:
        """The best weights as safetensors bytes, checksum-verified."""
        return self._read_verified("best.json")[0]

    def load_weights(self) -> tuple[dict[str, torch.Tensor], dict]:
        data, record = self._read_verified("best.json")
        try:
            return load_safetensors(data), record
        except Exception as error:
            raise RunError(f"{self.key('best.safetensors')}: cannot be loaded "
                           f"({type(error).__name__})") from None

    def write_history(self, history: list[dict]) -> None:
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
        self.store.put_bytes(self.key("metrics.jsonl"), lines.encode())
