"""The model registry: immutable numbered versions, aliases moved by compare-and-swap, history.

Owns everything under `registry/<model>/` on a store:

```
versions/<NNNNNN>/CLAIM              create-only: allocates the number (from 000001)
versions/<NNNNNN>/model.safetensors  weights only (never a pickle)
versions/<NNNNNN>/card.json          the caller's card + version, model, weights_sha256, registered_at
versions/<NNNNNN>/card.md            the card rendered for people (by the caller's `render`)
versions/<NNNNNN>/<extra files>      report.md, confusion.png, curves.png, ...
versions/<NNNNNN>/COMMITTED          written LAST, create-only: {weights_sha256, committed_at}
aliases/<alias>.json                 {alias, version, sha256, seq, previous, updated_at}: CAS only
aliases/<alias>/history/<seq>.json   create-only, seq 1, 2, 3... (8 digits), gap-free;
                                     {seq, from, to, sha256, previous, reason, forced,
                                      rollback, time, writer}
```

A version without COMMITTED is an interrupted registration: it is listed, but it can never be
loaded or put behind an alias. Weights are verified against their sha256 whenever they are
loaded or an alias is about to point at them.

The registry never decides: the gate and promoting past it live in `flowerml.promotion`, which
moves aliases with `set_alias(..., expect_seq=...)` and decides again on `AliasMoved`. Cards are
free-form JSON; `flowerml.release` builds and renders them.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerml.errors import UserError
from flowerml.files import json_bytes, sha256_hex
from flowerml.storage import ObjectNotFound, PreconditionFailed, Store

if TYPE_CHECKING:
    import torch

MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_NAME = re.compile(MODEL_NAME)
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^\d{6}$")
MAX_VERSION = 999_999
DEFAULT_ALIAS = "production"

WEIGHTS = "model.safetensors"
CARD_JSON = "card.json"
CARD_MD = "card.md"
CLAIM = "CLAIM"
COMMITTED = "COMMITTED"
RESERVED_FILES = frozenset({WEIGHTS, CARD_JSON, CARD_MD, CLAIM, COMMITTED})
CARD_FIELDS = ("version", "model", "weights_sha256", "registered_at")

RenderCard = Callable[[dict, list[str]], str]
"""(the full card, the extra files' names) -> card.md: see `release.render_card`."""


class RegistryError(UserError):
    """An unknown model, alias or version, an uncommitted or corrupt version, or a bad name."""


class RegistryNotFound(RegistryError):
    """A version or alias the registry does not have."""

    kind = "not-found"


class AliasMoved(Exception):
    """The alias changed since the caller decided; it must decide again against `current`."""

    def __init__(self, current: AliasState | None) -> None:
        super().__init__("alias moved")
        self.current = current


# --------------------------------------------------------------------------------------------
# Values


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


@dataclass(frozen=True)
class AliasState:
    """An alias as read, with the etag that a compare-and-swap must match."""

    alias: str
    version: int
    sha256: str
    seq: int
    previous: int | None
    etag: str


def check_name(name: str, what: str = "model") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"{what} name must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit (got {name!r})")
    return name


def parse_model_ref(ref: str, default_alias: str = DEFAULT_ALIAS
                    ) -> tuple[str, str | None, int | None]:
    """'m' -> (m, default_alias, None); 'm@alias' -> (m, alias, None); 'm:3' or 'm:000003' -> (m, None, 3)."""
    model, at, alias = ref.partition("@")
    model, colon, number = model.partition(":")
    if at and colon:
        raise RegistryError(f"model reference {ref!r} names both an alias and a version")
    check_name(model)
    if colon:
        return model, None, _parse_version(number, ref)
    return model, check_name(alias, "alias") if at else default_alias, None


def _parse_version(text: str, ref: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_VERSION:
        raise RegistryError(f"model reference {ref!r}: version must be a number from 1 to "
                            f"{MAX_VERSION}")
    return int(text)


def list_models(store: Store) -> list[str]:
    """Every model name with anything under registry/."""
    names = {info.key.split("/")[1] for info in store.list("registry/")}
    return sorted(name for name in names if _NAME.fullmatch(name))


def resolve_ref(store: Store, ref: str, default_alias: str = DEFAULT_ALIAS) -> ModelVersion:
    """The committed version a reference like 'flowers102@production' or 'flowers102:3' names."""
    model, alias, version = parse_model_ref(ref, default_alias)
    return Registry(store, model).resolve(alias, version)


def is_rollback(entry: dict) -> bool:
    """Whether a history entry records a rollback (entries written before the `rollback` field
    existed were rollbacks when their reason was 'rollback')."""
    if "rollback" in entry:
        return entry["rollback"] is True
    return str(entry.get("reason", "")).startswith("rollback")


def promotion_chain(history: Iterable[dict]) -> list[int]:
    """The versions a rollback walks back through, oldest first; the last is the current one.

    Replays the alias's history (ascending by seq): a move appends its target, a rollback
    drops every occurrence of the version it rolled away from (so that no later rollback can
    return to it, unless it is promoted again), and consecutive repeats collapse.
    """
    chain: list[int] = []
    for entry in history:
        if is_rollback(entry) and entry.get("from") is not None:
            chain = [v for v in chain if v != entry["from"]]
            chain = [v for i, v in enumerate(chain) if i == 0 or chain[i - 1] != v]
        if not chain or chain[-1] != entry["to"]:
            chain.append(entry["to"])
    return chain


# --------------------------------------------------------------------------------------------
# Small pure helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
    return card


# --------------------------------------------------------------------------------------------
# The registry


class Registry:
    """One model's versions and aliases on a store."""

    def __init__(self, store: Store, model: str) -> None:
        self.store = store
        self.model = check_name(model)
        self.root = f"registry/{model}"

    # keys ------------------------------------------------------------------------------------

    def _version_key(self, version: int, name: str) -> str:
        return f"{self.root}/versions/{version:06d}/{name}"

    def _alias_key(self, alias: str) -> str:
        return f"{self.root}/aliases/{alias}.json"

    def _history_key(self, alias: str, seq: int) -> str:
        return f"{self.root}/aliases/{alias}/history/{seq:08d}.json"

    def _v(self, version: int) -> str:
        return f"{self.model} version {version:06d}"

    def _read_json(self, key: str) -> Any | None:
        try:
            return json.loads(self.store.get_bytes(key))
        except ObjectNotFound:
            return None
        except ValueError:
            raise RegistryError(f"{key}: is not valid JSON") from None

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
        full_card = {**card, "version": version, "model": self.model, "weights_sha256": sha,
                     "registered_at": _now()}
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
                             json_bytes({"weights_sha256": sha, "committed_at": _now()}),
                             if_none_match=True)

    def _claim_next_version(self) -> int:
        """Allocate max+1 with a create-only CLAIM; a concurrent registrar makes us try the next."""
        numbers = self._version_files()
        version = max(numbers, default=0) + 1
        while version <= MAX_VERSION:
            if self._create_verified(self._version_key(version, CLAIM),
                                     {"claimed_at": _now(), "token": uuid.uuid4().hex}):
                return version
            version += 1
        raise RegistryError(f"{self.model} has no version numbers left (max {MAX_VERSION})")

    def _create_verified(self, key: str, value: dict) -> bool:
        """Create-only write; True when this writer owns `key`.

        The read-back costs one GET and guards against stores whose conditional PUT checks and
        then writes without a lock (moto's server): there two creators can both get 200, and
        only the one whose bytes are still there may go on. Real S3 and LocalStore never
        let two through, so on them the read-back always agrees.
        """
        data = json_bytes(value)
        try:
            self.store.put_bytes(key, data, if_none_match=True)
        except PreconditionFailed:
            return False
        try:
            return self.store.get_bytes(key) == data
        except ObjectNotFound:
            return False

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

    def _version(self, version: int, names: set[str] | None = None) -> ModelVersion:
        """One version; `names` (its files, from a listing) saves the reads of absent ones."""
        committed = self._read_optional(version, COMMITTED, names)
        card = self._read_optional(version, CARD_JSON, names)
        if committed is None and card is None and not names and not self.store.exists(
                self._version_key(version, CLAIM)):
            raise RegistryNotFound(f"{self.model} has no version {version:06d}")
        if not isinstance(committed, dict | None) or not isinstance(card, dict | None):
            raise RegistryError(f"{self._v(version)}: its COMMITTED or card.json is not a "
                                "JSON object")
        card = card or {}
        # COMMITTED is the authoritative record of the sha256; the card's copy is for people.
        sha = (committed or {}).get("weights_sha256") or card.get("weights_sha256", "")
        return ModelVersion(self.model, version, card, sha, committed is not None)

    def _read_optional(self, version: int, name: str, names: set[str] | None) -> Any | None:
        if names is not None and name not in names:
            return None
        return self._read_json(self._version_key(version, name))

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

    # aliases --------------------------------------------------------------------------------

    def alias(self, alias: str = DEFAULT_ALIAS) -> AliasState | None:
        """The alias as it is now, or None when it was never set."""
        check_name(alias, "alias")
        key = self._alias_key(alias)
        try:
            raw, etag = self.store.get_with_etag(key)
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(raw)
            return AliasState(alias, int(doc["version"]), str(doc["sha256"]), int(doc["seq"]),
                              doc["previous"], etag)
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"{key}: is not a valid alias record") from None

    def aliases(self) -> dict[str, AliasState]:
        """Every alias of this model, by name."""
        prefix = f"{self.root}/aliases/"
        names = [info.key[len(prefix):-len(".json")] for info in self.store.list(prefix)
                 if info.key.endswith(".json") and "/" not in info.key[len(prefix):]]
        states = {name: self.alias(name) for name in names if _NAME.fullmatch(name)}
        return {name: state for name, state in states.items() if state is not None}

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

    def history(self, alias: str = DEFAULT_ALIAS) -> list[dict]:
        """The alias's moves, ascending by seq."""
        check_name(alias, "alias")
        prefix = f"{self.root}/aliases/{alias}/history/"
        entries = [self._read_json(info.key) for info in self.store.list(prefix)]
        return sorted((e for e in entries if e is not None), key=lambda e: e["seq"])

    def set_alias(self, alias: str, version: int, *, reason: str, forced: bool = False,
                  expect_seq: int | None = None) -> AliasState:
        """Point `alias` at a committed version whose weights check out; retries until it wins.

        With `expect_seq` (0: the alias is unset) it is a compare-and-swap on a decision: the
        move happens only from that seq, and otherwise raises `AliasMoved` with the alias as it
        is now, so the caller can decide again (see `promotion.promote`).
        """
        check_name(alias, "alias")
        if not isinstance(reason, str) or not reason.strip():
            raise RegistryError("a reason is required to move an alias")
        target, _ = self._verified_bytes(version)  # never point an alias at bad weights
        return self._move_alias(alias, target, reason=reason, forced=forced,
                                expect_seq=expect_seq)

    def has_versions(self) -> bool:
        """Whether anything was ever registered under this model (one listing, no reads)."""
        return next(iter(self.store.list(f"{self.root}/versions/")), None) is not None

    def rollback_target(self, alias: str = DEFAULT_ALIAS) -> tuple[AliasState, int]:
        """The alias as it is now and the version a rollback would move it to (see `rollback`)."""
        current = self.alias(alias)
        if current is None:
            raise RegistryNotFound(f"{self.model} has no alias '{alias}'")
        chain = promotion_chain(e for e in self.history(alias) if e["seq"] <= current.seq)
        earlier = [v for v in chain if v != current.version]
        if not earlier:
            raise RegistryError(f"alias {alias} of {self.model} has no previous version to "
                                "roll back to")
        return current, earlier[-1]

    def rollback(self, alias: str = DEFAULT_ALIAS, *, reason: str = "rollback") -> AliasState:
        """Move the alias back along its chain of promotions: to the version promoted before
        the current one, skipping versions that were rolled away from. A second rollback goes
        one step further back (never forward again); with nothing earlier it is refused. The
        move is recorded in the history with `rollback: true`."""
        current, version = self.rollback_target(alias)
        target, _ = self._verified_bytes(version)
        try:
            return self._move_alias(alias, target, reason=reason, forced=False,
                                    expect_seq=current.seq, rollback=True)
        except AliasMoved as moved:
            # Rolling back is a decision about one state; after a concurrent move it could
            # undo someone else's change instead, so let the operator look again.
            now = f"v{moved.current.version:06d}" if moved.current else "unset"
            raise RegistryError(f"alias {alias} of {self.model} moved while rolling back (now "
                                f"{now}); check its history and run rollback again") from None

    # The alias-move protocol ----------------------------------------------------------------
    #
    # History entry seq N is the decision "move N"; alias.json is the result of applying the
    # latest decision. A writer first wins the create-only history slot seq+1, then swaps the
    # alias with the etag it read. Whoever finds a slot taken but the alias not yet swapped
    # (its winner crashed or is slow) applies that entry for it, so history stays gap-free,
    # each entry's `from` is the previous entry's `to`, and the alias always ends equal to the
    # last entry. Every alias.json is a pure function of its entry, so owner and helpers write
    # identical bytes and it does not matter which of them lands.

    def _move_alias(self, alias: str, target: ModelVersion, *, reason: str, forced: bool,
                    expect_seq: int | None = None, rollback: bool = False) -> AliasState:
        """Move `alias` to `target`; with `expect_seq`, only from that seq (else AliasMoved)."""
        writer = uuid.uuid4().hex  # recognises our entry when reading it back
        while True:
            current = self.alias(alias)                                     # 1. fresh read
            seq = current.seq if current else 0
            if expect_seq is not None and seq != expect_seq:
                raise AliasMoved(current)
            entry = self._entry(seq + 1, current, target, reason, forced, writer, rollback)
            if not self._create_verified(self._history_key(alias, seq + 1), entry):   # 2.
                self._roll_forward(alias, current, seq + 1)  # the slot's winner may be gone
                continue                                     # re-read, decide again
            return self._apply(alias, current, entry)                       # 3. swap

    def _entry(self, seq: int, current: AliasState | None, target: ModelVersion, reason: str,
               forced: bool, writer: str, rollback: bool = False) -> dict:
        previous = current.previous if current else None
        if current is not None and current.version != target.version:
            previous = current.version  # re-pointing at the same version keeps the old undo
        return {"seq": seq, "from": current.version if current else None, "to": target.version,
                "sha256": target.weights_sha256, "previous": previous, "reason": reason,
                "forced": forced, "rollback": rollback, "time": _now(), "writer": writer}

    def _alias_doc(self, alias: str, entry: dict) -> dict:
        return {"alias": alias, "version": entry["to"], "sha256": entry["sha256"],
                "seq": entry["seq"], "previous": entry["previous"], "updated_at": entry["time"]}

    def _swap(self, alias: str, doc: dict, etag: str | None) -> str:
        """Compare-and-swap alias.json: replace exactly `etag`, or create when there was none."""
        data = json_bytes(doc)
        if etag is None:
            return self.store.put_bytes(self._alias_key(alias), data, if_none_match=True)
        return self.store.put_bytes(self._alias_key(alias), data, if_match=etag)

    def _roll_forward(self, alias: str, current: AliasState | None, seq: int) -> None:
        """Apply history entry `seq` if the alias is still where we read it (seq - 1)."""
        entry = self._read_json(self._history_key(alias, seq))
        if entry is None:
            return
        # Losing this swap is fine: the alias already moved on (its owner or a helper applied it).
        with contextlib.suppress(PreconditionFailed):
            self._swap(alias, self._alias_doc(alias, entry), current.etag if current else None)

    def _apply(self, alias: str, current: AliasState | None, entry: dict) -> AliasState:
        """Step 3: swap the alias to our entry; losing the swap means a helper applied it."""
        doc = self._alias_doc(alias, entry)
        etag = current.etag if current else None
        while True:
            try:
                return self._state(doc, self._swap(alias, doc, etag))
            except PreconditionFailed:
                now = self.alias(alias)
            if now is not None and now.seq >= entry["seq"]:
                return now if now.seq == entry["seq"] else self._state(doc, "")
            # Only a store whose conditional writes are not atomic gets here (the alias is
            # still behind our entry under a new etag): swap again from what is there now.
            etag = now.etag if now else None

    @staticmethod
    def _state(doc: dict, etag: str) -> AliasState:
        return AliasState(doc["alias"], doc["version"], doc["sha256"], doc["seq"],
                          doc["previous"], etag)
