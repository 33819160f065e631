"""A model's aliases in the registry: reading them, their history, and moving them by
compare-and-swap (the alias-move protocol).

Owns `registry/<model>/aliases/` on a store:

```
aliases/<alias>.json                 {alias, version, sha256, seq, previous, updated_at}: CAS only
aliases/<alias>/history/<seq>.json   create-only, seq 1, 2, 3... (8 digits), gap-free;
                                     {seq, from, to, sha256, previous, reason, forced,
                                      rollback, time, writer}
```

`ModelAliases` is the base of `flowerml.registry.versions.Registry`, which adds the versions and checks
a version's weights before any alias may point at it. Deciding whether to move an alias is the
gates' (`flowerml.registry.gates`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ConfigDict, Field

from flowerml.core.documents import DocumentError, Sha256, StoredDocument, plain, read_document
from flowerml.core.files import json_bytes
from flowerml.io.storage import ObjectNotFound, PreconditionFailed, Store
from flowerml.registry.names import (
    DEFAULT_ALIAS,
    RegistryError,
    RegistryNotFound,
    check_name,
    is_name,
    now,
)

Document = TypeVar("Document", bound=StoredDocument)


class DamagedRegistryDocument(DocumentError, RegistryError):
    """A card.json, COMMITTED, alias or history entry that does not read as its document."""


class AliasMoved(Exception):
    """The alias changed since the caller decided; it must decide again against `current`."""

    def __init__(self, current: AliasState | None) -> None:
        super().__init__("alias moved")
        self.current = current


class AliasRecord(StoredDocument):
    """`aliases/<alias>.json`: a pure function of the history entry it applies."""

    alias: str
    version: int
    sha256: Sha256
    seq: int
    previous: int | None
    updated_at: str


class HistoryEntry(StoredDocument):
    """`aliases/<alias>/history/<seq>.json`, create-only. `rollback` is absent from entries
    written before it existed (then a reason starting with 'rollback' marks one)."""

    model_config = ConfigDict(populate_by_name=True)

    seq: int = Field(ge=1)
    from_: int | None = Field(alias="from")
    to: int
    sha256: Sha256
    previous: int | None
    reason: str
    forced: bool
    rollback: bool = False
    time: str
    writer: str


@dataclass(frozen=True)
class AliasState:
    """An alias as read, with the etag that a compare-and-swap must match."""

    alias: str
    version: int
    sha256: str
    seq: int
    previous: int | None
    etag: str


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


class ModelAliases:
    """One model's aliases on a store, and their history."""

    def __init__(self, store: Store, model: str) -> None:
        self.store = store
        self.model = check_name(model)
        self.root = f"registry/{model}"

    def _alias_key(self, alias: str) -> str:
        return f"{self.root}/aliases/{alias}.json"

    def _history_key(self, alias: str, seq: int) -> str:
        return f"{self.root}/aliases/{alias}/history/{seq:08d}.json"

    def _read_document(self, key: str, model: type[Document]) -> Document | None:
        """The document at `key` validated as `model`; None when there is none."""
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            return None
        return read_document(model, raw, key, DamagedRegistryDocument)

    # reading --------------------------------------------------------------------------------

    def alias(self, alias: str = DEFAULT_ALIAS) -> AliasState | None:
        """The alias as it is now, or None when it was never set."""
        check_name(alias, "alias")
        key = self._alias_key(alias)
        try:
            raw, etag = self.store.get_with_etag(key)
        except ObjectNotFound:
            return None
        doc = read_document(AliasRecord, raw, key, DamagedRegistryDocument)
        return AliasState(alias, doc.version, doc.sha256, doc.seq, doc.previous, etag)

    def aliases(self) -> dict[str, AliasState]:
        """Every alias of this model, by name."""
        prefix = f"{self.root}/aliases/"
        names = [info.key[len(prefix):-len(".json")] for info in self.store.list(prefix)
                 if info.key.endswith(".json") and "/" not in info.key[len(prefix):]]
        states = {name: self.alias(name) for name in names if is_name(name)}
        return {name: state for name, state in states.items() if state is not None}

    def history(self, alias: str = DEFAULT_ALIAS) -> list[dict]:
        """The alias's moves, ascending by seq (each a `HistoryEntry` as stored)."""
        check_name(alias, "alias")
        prefix = f"{self.root}/aliases/{alias}/history/"
        entries = [self._read_document(info.key, HistoryEntry)
                   for info in self.store.list(prefix)]
        return [plain(e) for e in sorted((e for e in entries if e is not None),
                                         key=lambda e: e.seq)]

    def rollback_target(self, alias: str = DEFAULT_ALIAS) -> tuple[AliasState, int]:
        """The alias as it is now and the version a rollback would move it to (see
        `Registry.rollback`)."""
        current = self.alias(alias)
        if current is None:
            raise RegistryNotFound(f"{self.model} has no alias '{alias}'")
        chain = promotion_chain(e for e in self.history(alias) if e["seq"] <= current.seq)
        earlier = [v for v in chain if v != current.version]
        if not earlier:
            raise RegistryError(f"alias {alias} of {self.model} has no previous version to "
                                "roll back to")
        return current, earlier[-1]

    # The alias-move protocol ----------------------------------------------------------------
    #
    # History entry seq N is the decision "move N"; alias.json is the result of applying the
    # latest decision. A writer first wins the create-only history slot seq+1, then swaps the
    # alias with the etag it read. Whoever finds a slot taken but the alias not yet swapped
    # (its winner crashed or is slow) applies that entry for it, so history stays gap-free,
    # each entry's `from` is the previous entry's `to`, and the alias always ends equal to the
    # last entry. Every alias.json is a pure function of its entry, so owner and helpers write
    # identical bytes and it does not matter which of them lands.

    def _move_alias(self, alias: str, version: int, sha256: str, *, reason: str, forced: bool,
                    expect_seq: int | None = None, rollback: bool = False) -> AliasState:
        """Move `alias` to `version` (whose weights' checksum the caller verified as `sha256`);
        with `expect_seq`, only from that seq (else AliasMoved)."""
        writer = uuid.uuid4().hex  # recognises our entry when reading it back
        while True:
            current = self.alias(alias)                                     # 1. fresh read
            seq = current.seq if current else 0
            if expect_seq is not None and seq != expect_seq:
                raise AliasMoved(current)
            entry = self._entry(seq + 1, current, version, sha256, reason, forced, writer,
                                rollback)
            if not self.store.put_if_absent(self._history_key(alias, seq + 1),
                                            json_bytes(entry)):                  # 2.
                self._roll_forward(alias, current, seq + 1)  # the slot's winner may be gone
                continue                                     # re-read, decide again
            return self._apply(alias, current, entry)                       # 3. swap

    def _entry(self, seq: int, current: AliasState | None, version: int, sha256: str,
               reason: str, forced: bool, writer: str, rollback: bool = False) -> dict:
        previous = current.previous if current else None
        if current is not None and current.version != version:
            previous = current.version  # re-pointing at the same version keeps the old undo
        return plain(HistoryEntry(seq=seq, from_=current.version if current else None,
                                  to=version, sha256=sha256, previous=previous, reason=reason,
                                  forced=forced, rollback=rollback, time=now(), writer=writer))

    def _alias_doc(self, alias: str, entry: dict) -> dict:
        return plain(AliasRecord(alias=alias, version=entry["to"], sha256=entry["sha256"],
                                 seq=entry["seq"], previous=entry["previous"],
                                 updated_at=entry["time"]))

    def _swap(self, alias: str, doc: dict, etag: str | None) -> str:
        """Compare-and-swap alias.json: replace exactly `etag`, or create when there was none."""
        data = json_bytes(doc)
        if etag is None:
            return self.store.put_bytes(self._alias_key(alias), data, if_none_match=True)
        return self.store.put_bytes(self._alias_key(alias), data, if_match=etag)

    def _roll_forward(self, alias: str, current: AliasState | None, seq: int) -> None:
        """Apply history entry `seq` if the alias is still where we read it (seq - 1)."""
        found = self._read_document(self._history_key(alias, seq), HistoryEntry)
        if found is None:
            return
        entry = plain(found)
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
                now_there = self.alias(alias)
            if now_there is not None and now_there.seq >= entry["seq"]:
                return now_there if now_there.seq == entry["seq"] else self._state(doc, "")
            # Only a store whose conditional writes are not atomic gets here (the alias is
            # still behind our entry under a new etag): swap again from what is there now.
            etag = now_there.etag if now_there else None

    @staticmethod
    def _state(doc: dict, etag: str) -> AliasState:
        return AliasState(doc["alias"], doc["version"], doc["sha256"], doc["seq"],
                          doc["previous"], etag)
