"""The model registry: immutable numbered versions of a model, and the aliases that point at
them (moved by `flowerml.registry.aliases`, whose `ModelAliases` is `Registry`'s base).

Owns `registry/<model>/versions/` on a store:

```
versions/<NNNNNN>/CLAIM              create-only: allocates the number (from 000001)
versions/<NNNNNN>/model.safetensors  weights only (never a pickle)
versions/<NNNNNN>/card.json          the caller's card + version, model, weights_sha256, registered_at
versions/<NNNNNN>/card.md            the card rendered for people (by the caller's `render`)
versions/<NNNNNN>/<extra files>      report.md, confusion.png, curves.png, ...
versions/<NNNNNN>/COMMITTED          written LAST, create-only: {weights_sha256, committed_at}
```

A version without COMMITTED is an interrupted registration: it is listed, but it can never be
loaded or put behind an alias. Weights are verified against their sha256 whenever they are
loaded or an alias is about to point at them.

The registry never decides: the gates (`flowerml.registry.gates`) move aliases with
`set_alias(..., expect_seq=...)` and decide again on `AliasMoved`. Cards are free-form JSON;
`flowerml.registry.release` builds and renders them.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowerml.core.documents import Sha256, StoredDocument, check_document, plain
from flowerml.core.files import json_bytes, sha256_hex
from flowerml.io.storage import ObjectNotFound, PreconditionFailed, Store
from flowerml.registry.aliases import AliasMoved, AliasState, Document, ModelAliases
from flowerml.registry.model_card import CardFields, ModelCard
from flowerml.registry.names import (
    DEFAULT_ALIAS,
    MAX_VERSION,
    RegistryError,
    RegistryNotFound,
    check_name,
    is_name,
    now,
    parse_model_ref,
)

if TYPE_CHECKING:
    import torch

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^\d{6}$")


WEIGHTS = "model.safetensors"
CARD_JSON = "card.json"
CARD_MD = "card.md"
CLAIM = "CLAIM"
COMMITTED = "COMMITTED"
RESERVED_FILES = frozenset({WEIGHTS, CARD_JSON, CARD_MD, CLAIM, COMMITTED})
CARD_FIELDS = ("version", "model", "weights_sha256", "registered_at")



class Committed(StoredDocument):
    """`versions/<NNNNNN>/COMMITTED`: the authoritative sha256 of the version's weights."""

    weights_sha256: Sha256
    committed_at: str


class Claim(StoredDocument):
    """`versions/<NNNNNN>/CLAIM`: who allocated the number, and when. Only its existence is
    read (create-only: the first registrar to write it owns the number)."""

    claimed_at: str
    token: str


RenderCard = Callable[[dict, list[str]], str]
"""(the full card, the extra files' names) -> card.md: see `release.render_card`."""


@dataclass(frozen=True)
class ModelVersion:
    """One numbered version; `committed` is False for an interrupted registration."""

    model: str
    version: int
    card: dict
    weights_sha256: str
    committed: bool

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version:06d}"


def list_models(store: Store) -> list[str]:
    """Every model name with anything under registry/."""
    names = {info.key.split("/")[1] for info in store.list("registry/")}
    return sorted(name for name in names if is_name(name))


def resolve_ref(store: Store, ref: str, default_alias: str = DEFAULT_ALIAS) -> ModelVersion:
    """The committed version a reference like 'flowers102@production' or 'flowers102:3' names."""
    model, alias, version = parse_model_ref(ref, default_alias)
    return Registry(store, model).resolve(alias, version)


# --------------------------------------------------------------------------------------------
# Small pure helpers


def _weights_bytes(weights: dict[str, torch.Tensor] | bytes) -> bytes:
    """safetensors bytes for a state dict, or the given bytes once they look like safetensors."""
    if isinstance(weights, dict):
        # torch is imported only here and in load_weights: reading cards, aliases and history
        # (the CLI, the alias-race workers) should not pay seconds for it.
        import torch
        from safetensors.torch import save as save_safetensors

        if not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise RegistryError("weights must map names to tensors")
        return save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()})
    if not isinstance(weights, bytes | bytearray) or not _is_safetensors(bytes(weights)):
        raise RegistryError("weights must be a dict of tensors or safetensors bytes "
                            "(a pickle or other format is refused)")
    return bytes(weights)


def _is_safetensors(data: bytes) -> bool:
    # Header check only (u64 length + JSON object): a full parse would copy every tensor.
    if len(data) < 8:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        return False
    try:
        return isinstance(json.loads(data[8:8 + length]), dict)
    except ValueError:
        return False


def _checked_files(files: dict[str, bytes | Path] | None) -> dict[str, bytes | Path]:
    for name, payload in (files or {}).items():
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in RESERVED_FILES:
            raise RegistryError(f"extra file name {name!r} is not allowed (plain names only; "
                                f"not one of {', '.join(sorted(RESERVED_FILES))})")
        if isinstance(payload, Path) and not payload.is_file():
            raise RegistryError(f"extra file {name}: {payload} does not exist")
        if not isinstance(payload, bytes | Path):
            raise RegistryError(f"extra file {name}: give bytes or a Path")
    return dict(files or {})


def _checked_card(card: dict) -> dict:
    if not isinstance(card, dict):
        raise RegistryError("the model card must be a dict")
    try:
        json.dumps(card)
    except (TypeError, ValueError) as error:
        raise RegistryError(f"the model card is not JSON-serialisable: {error}") from None
    check_document(CardFields, card, "the model card", RegistryError)
    return card


# --------------------------------------------------------------------------------------------
# The registry


class Registry(ModelAliases):
    """One model's versions on a store, and its aliases (`ModelAliases`)."""

    def _version_key(self, version: int, name: str) -> str:
        return f"{self.root}/versions/{version:06d}/{name}"

    def _v(self, version: int) -> str:
        return f"{self.model} version {version:06d}"

    # registering ----------------------------------------------------------------------------

    def register(self, weights: dict[str, torch.Tensor] | bytes, card: dict,
                 files: dict[str, bytes | Path] | None = None, *,
                 render: RenderCard | None = None) -> ModelVersion:
        """Write a new version, COMMITTED last; returns it. Bad input is refused before anything
        is written. `render` turns the full card (with the version's number, sha256 and time)
        into card.md; without it the version has no card.md."""
        data = _weights_bytes(weights)
        extra = _checked_files(files)
        card = _checked_card(card)
        version = self._claim_next_version()
        sha = sha256_hex(data)
        full_card = plain(check_document(ModelCard, {
            **card, "version": version, "model": self.model, "weights_sha256": sha,
            "registered_at": now()}, self._version_key(version, CARD_JSON), RegistryError))
        self.store.put_bytes(self._version_key(version, WEIGHTS), data)
        self.store.put_bytes(self._version_key(version, CARD_JSON), json_bytes(full_card))
        if render is not None:
            self.store.put_bytes(self._version_key(version, CARD_MD),
                                 render(full_card, list(extra)).encode())
        for name, payload in extra.items():
            if isinstance(payload, Path):
                self.store.put_file(self._version_key(version, name), payload)
            else:
                self.store.put_bytes(self._version_key(version, name), payload)
        self._commit(version, sha)
        return ModelVersion(self.model, version, full_card, sha, True)

    def _commit(self, version: int, sha: str) -> None:
        """The pointer goes last: a version is only usable once everything else is in place.
        (Tests simulate a crash before it by making this step raise.)"""
        self.store.put_bytes(self._version_key(version, COMMITTED),
                             json_bytes(plain(Committed(weights_sha256=sha,
                                                        committed_at=now()))),
                             if_none_match=True)

    def _claim_next_version(self) -> int:
        """Allocate max+1 with a create-only CLAIM; a concurrent registrar makes us try the next."""
        numbers = self._version_files()
        version = max(numbers, default=0) + 1
        while version <= MAX_VERSION:
            claim = json_bytes(plain(Claim(claimed_at=now(), token=uuid.uuid4().hex)))
            if self.store.put_if_absent(self._version_key(version, CLAIM), claim):
                return version
            version += 1
        raise RegistryError(f"{self.model} has no version numbers left (max {MAX_VERSION})")

    # attachments: files added to a committed version later (its ONNX export) --------------

    def attach(self, version: int, name: str, payload: bytes | Path) -> bool:
        """Add a file to a committed version, create-only; False when it is already there (the
        version keeps the first one: a version never changes what it holds)."""
        self.require_committed(version)
        _checked_files({name: payload})
        key = self._version_key(version, name)
        data = payload.read_bytes() if isinstance(payload, Path) else payload
        try:
            self.store.put_bytes(key, data, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def read_attachment(self, version: int, name: str) -> bytes | None:
        """A file attached to (or registered with) a version; None when it has none."""
        _checked_files({name: b""})
        try:
            return self.store.get_bytes(self._version_key(version, name))
        except ObjectNotFound:
            return None

    def attachment_key(self, version: int, name: str) -> str:
        return self._version_key(version, name)

    # reading versions -----------------------------------------------------------------------

    def _version_files(self) -> dict[int, set[str]]:
        prefix = f"{self.root}/versions/"
        found: dict[int, set[str]] = {}
        for info in self.store.list(prefix):
            number, _, name = info.key[len(prefix):].partition("/")
            if _VERSION_DIR.fullmatch(number) and name:
                found.setdefault(int(number), set()).add(name)
        return found

    def versions(self) -> list[ModelVersion]:
        """Every numbered version, committed or not, ascending."""
        return [self._version(number, names)
                for number, names in sorted(self._version_files().items())]

    def has_versions(self) -> bool:
        """Whether anything was ever registered under this model (one listing, no reads)."""
        return next(iter(self.store.list(f"{self.root}/versions/")), None) is not None

    def _version(self, version: int, names: set[str] | None = None) -> ModelVersion:
        """One version; `names` (its files, from a listing) saves the reads of absent ones."""
        committed = self._read_optional(version, COMMITTED, Committed, names)
        card = self._read_optional(version, CARD_JSON, ModelCard, names)
        if committed is None and card is None and not names and not self.store.exists(
                self._version_key(version, CLAIM)):
            raise RegistryNotFound(f"{self.model} has no version {version:06d}")
        # COMMITTED is the authoritative record of the sha256; the card's copy is for people.
        sha = committed.weights_sha256 if committed else card.weights_sha256 if card else ""
        return ModelVersion(self.model, version, plain(card) if card else {}, sha,
                            committed is not None)

    def _read_optional(self, version: int, name: str, model: type[Document],
                       names: set[str] | None) -> Document | None:
        if names is not None and name not in names:
            return None
        return self._read_document(self._version_key(version, name), model)

    def get(self, version: int) -> ModelVersion:
        if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise RegistryError(f"{self.model}: version must be a number from 1 to "
                                f"{MAX_VERSION} (got {version!r})")
        return self._version(version)

    def require_committed(self, version: int) -> ModelVersion:
        found = self.get(version)
        if not found.committed:
            raise RegistryError(f"{self._v(version)} is not COMMITTED (an interrupted "
                                "registration); it cannot be promoted or loaded")
        return found

    def _verified_bytes(self, version: int) -> tuple[ModelVersion, bytes]:
        found = self.require_committed(version)
        key = self._version_key(version, WEIGHTS)
        try:
            data = self.store.get_bytes(key)
        except ObjectNotFound:
            raise RegistryError(f"{self._v(version)}: {WEIGHTS} is missing") from None
        expected = {found.weights_sha256, found.card.get("weights_sha256", found.weights_sha256)}
        actual = sha256_hex(data)
        if expected != {actual}:
            raise RegistryError(f"{self._v(version)}: weights fail their checksum ({key} has "
                                f"sha256 {actual}, recorded {found.weights_sha256})")
        return found, data

    def verify(self, version: int) -> None:
        """Check the stored weights against their recorded sha256 without loading them."""
        self._verified_bytes(version)

    def load_weights(self, version: int) -> dict[str, torch.Tensor]:
        """The weights of a committed version, verified (safetensors: nothing is unpickled)."""
        from safetensors.torch import load as load_safetensors

        _, data = self._verified_bytes(version)
        return load_safetensors(data)

    # aliases: only to committed versions whose weights check out ------------------------------

    def resolve(self, alias: str | None = None, version: int | None = None) -> ModelVersion:
        """The committed version an alias points at, or a numbered one (give one, not both)."""
        if alias is not None and version is not None:
            raise RegistryError(f"{self.model}: give an alias or a version, not both")
        if version is not None:
            return self.require_committed(version)
        alias = alias or DEFAULT_ALIAS
        state = self.alias(alias)
        if state is None:
            raise RegistryNotFound(f"{self.model} has no alias '{alias}'")
        found = self.require_committed(state.version)
        if found.weights_sha256 != state.sha256:
            raise RegistryError(f"alias {alias} of {self.model} records sha256 {state.sha256} "
                                f"but {self._v(state.version)} has {found.weights_sha256}")
        return found

    def set_alias(self, alias: str, version: int, *, reason: str, forced: bool = False,
                  expect_seq: int | None = None) -> AliasState:
        """Point `alias` at a committed version whose weights check out; retries until it wins.

        With `expect_seq` (0: the alias is unset) it is a compare-and-swap on a decision: the
        move happens only from that seq, and otherwise raises `AliasMoved` with the alias as it
        is now, so the caller can decide again (see `gates.move_alias`).
        """
        check_name(alias, "alias")
        if not isinstance(reason, str) or not reason.strip():
            raise RegistryError("a reason is required to move an alias")
        target, _ = self._verified_bytes(version)  # never point an alias at bad weights
        return self._move_alias(alias, version, target.weights_sha256, reason=reason,
                                forced=forced, expect_seq=expect_seq)

    def rollback(self, alias: str = DEFAULT_ALIAS, *, reason: str = "rollback") -> AliasState:
        """Move the alias back along its chain of promotions: to the version promoted before
        the current one, skipping versions that were rolled away from. A second rollback goes
        one step further back (never forward again); with nothing earlier it is refused. The
        move is recorded in the history with `rollback: true`."""
        current, version = self.rollback_target(alias)
        target, _ = self._verified_bytes(version)
        try:
            return self._move_alias(alias, version, target.weights_sha256, reason=reason,
                                    forced=False, expect_seq=current.seq, rollback=True)
        except AliasMoved as moved:
            # Rolling back is a decision about one state; after a concurrent move it could
            # undo someone else's change instead, so let the operator look again.
            there = f"v{moved.current.version:06d}" if moved.current else "unset"
            raise RegistryError(f"alias {alias} of {self.model} moved while rolling back (now "
                                f"{there}); check its history and run rollback again") from None
