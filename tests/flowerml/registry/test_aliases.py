"""flowerml.registry.aliases: moving an alias (history first, then the compare-and-swap),
rolling it back along its chain, moves a crash left half-done rolled forward, and races of
many writers, in threads and processes, on LocalStore, moto and SeaweedFS.

torch is imported inside the tests that need it: the race test's worker processes import this
module (their forkserver, once), and importing torch would cost seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.aliases import AliasState, is_rollback, promotion_chain
from flowerml.registry.gates import Scorecard
from flowerml.registry.names import RegistryError
from flowerml.registry.promotion import promote
from flowerml.registry.versions import Registry
from tests.helpers.forkservers import stop_forkserver
from tests.helpers.registry_entries import MANIFEST, MODEL, card, weights

# --------------------------------------------------------------------------------------------
# Moves, rollbacks, and moves a crash left half-done


def test_rollback_without_previous_version(store: Store) -> None:
    registry = Registry(store, MODEL)
    registry.register(weights(1), card(0.96))
    with pytest.raises(RegistryError, match="flowers102 has no alias 'production'"):
        registry.rollback()
    registry.set_alias("production", 1, reason="first")
    with pytest.raises(RegistryError) as caught:
        registry.rollback()
    assert str(caught.value) == ("alias production of flowers102 has no previous version "
                                 "to roll back to")


def promote_three(registry: Registry) -> None:
    """Versions 1-4 registered; 1 and 2 promoted past the gate, 3 (below it) forced."""
    for seed, top1 in ((1, 0.96), (2, 0.97), (3, 0.5), (4, 0.98)):
        registry.register(weights(seed), card(top1))
    assert promote(registry, 1, scorecard=Scorecard(0.96, MANIFEST))[0]
    assert promote(registry, 2, scorecard=Scorecard(0.97, MANIFEST))[0]
    assert promote(registry, 3, scorecard=Scorecard(0.5, MANIFEST), force=True)[0]


def moves(registry: Registry) -> list[tuple[int | None, int, bool]]:
    return [(h["from"], h["to"], h["rollback"]) for h in registry.history()]


def test_rollback_walks_back_the_chain_of_promotions(store: Store) -> None:
    registry = Registry(store, MODEL)
    promote_three(registry)
    assert registry.alias().version == 3

    first = registry.rollback()
    assert (first.version, first.seq, first.previous) == (2, 4, 3)
    second = registry.rollback()  # further back, never forward to the forced version 3
    assert (second.version, second.seq, second.previous) == (1, 5, 2)
    with pytest.raises(RegistryError) as caught:
        registry.rollback()
    assert str(caught.value) == ("alias production of flowers102 has no previous version "
                                 "to roll back to")
    assert registry.alias().version == 1 and registry.alias().seq == 5  # nothing moved
    assert moves(registry) == [(None, 1, False), (1, 2, False), (2, 3, False), (3, 2, True),
                               (2, 1, True)]
    assert [h["forced"] for h in registry.history()] == [False, False, True, False, False]
    assert_consistent(registry.history(), registry.alias())


def test_a_promote_after_rollbacks_starts_a_new_chain(store: Store) -> None:
    registry = Registry(store, MODEL)
    promote_three(registry)
    registry.rollback()
    registry.rollback()                                      # 3 -> 2 -> 1
    champion = Scorecard(0.96, MANIFEST, version=1)
    assert promote(registry, 4, scorecard=Scorecard(0.98, MANIFEST), champion=champion)[0]
    assert registry.rollback().version == 1                  # back past 4, to where it began
    with pytest.raises(RegistryError, match="no previous version to roll back to"):
        registry.rollback()
    # a version rolled away from is a target again once it is promoted again
    registry.set_alias("production", 2, reason="promote again")
    registry.set_alias("production", 4, reason="promote again")
    assert registry.rollback().version == 2
    assert registry.rollback().version == 1
    assert moves(registry)[5:] == [(1, 4, False), (4, 1, True), (1, 2, False), (2, 4, False),
                                   (4, 2, True), (2, 1, True)]


def test_promotion_chain_skips_versions_rolled_away_from() -> None:
    def entry(seq: int, to: int, *, rollback: bool = False, frm: int | None = None) -> dict:
        return {"seq": seq, "from": frm, "to": to, "rollback": rollback, "reason": "x"}

    assert promotion_chain([]) == []
    # 1, 2, 1, 2: rolling back from 2 skips both 2s; from 1 there is nothing left
    history = [entry(1, 1), entry(2, 2), entry(3, 1), entry(4, 2)]
    assert promotion_chain(history) == [1, 2, 1, 2]
    history.append(entry(5, 1, rollback=True, frm=2))
    assert promotion_chain(history) == [1]
    # re-pointing at the same version adds nothing; a rollback recorded before the field
    # existed is recognised by its reason
    legacy = [entry(1, 1), entry(2, 1), entry(3, 2),
              {"seq": 4, "from": 2, "to": 1, "reason": "rollback"}]
    assert promotion_chain(legacy) == [1]


def test_a_rollback_rolls_a_crashed_move_forward_and_is_refused(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(store, MODEL)
    promote_three(registry)

    crashing = crashing_after_history_slot(store, monkeypatch)
    with pytest.raises(RuntimeError, match="crashed"):
        crashing.set_alias("production", 4, reason="crashed move")
    with pytest.raises(RegistryError, match="moved while rolling back \\(now v000004\\)"):
        registry.rollback()  # decided on seq 3, but seq 4 was decided: applied, then refused
    assert registry.alias().version == 4
    assert registry.rollback().version == 3  # decided again on the rolled-forward state
    assert_consistent(registry.history(), registry.alias())


def crashing_after_history_slot(store: Store, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A registry whose alias moves die between winning their history entry and the CAS."""
    def crash(*args: object, **kwargs: object) -> AliasState:
        raise RuntimeError("crashed after winning the history slot")

    crashing = Registry(store, MODEL)
    monkeypatch.setattr(crashing, "_apply", crash)
    return crashing


def test_a_crashed_move_is_rolled_forward_by_the_next_writer(store: Store,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    registry = Registry(store, MODEL)
    for seed in (1, 2, 3):
        registry.register(weights(seed), card(0.96))
    registry.set_alias("production", 1, reason="first")

    crashing = crashing_after_history_slot(store, monkeypatch)
    with pytest.raises(RuntimeError, match="crashed"):
        crashing.set_alias("production", 2, reason="crashed move")
    assert registry.alias().seq == 1 and len(registry.history()) == 2  # decided, not applied

    state = registry.set_alias("production", 3, reason="next move")
    assert (state.version, state.seq, state.previous) == (3, 3, 2)
    assert_consistent(registry.history(), registry.alias())


class DoubleWinStore(LocalStore):
    """Lets a create-only PUT of history seq 2 report success and then lands a rival's bytes on
    the same key, as moto's server can (it checks If-None-Match, then writes without a lock)."""

    rival: bytes | None = None

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        etag = super().put_bytes(key, data, if_none_match=if_none_match, if_match=if_match)
        if if_none_match and key.endswith("/history/00000002.json") and self.rival:
            rival, self.rival = self.rival, None
            super().put_bytes(key, rival)
        return etag


def test_a_create_that_was_overwritten_counts_as_lost(tmp_path: Path) -> None:
    store = DoubleWinStore(tmp_path / "store")
    registry = setup_race(store)
    registry.set_alias("production", 1, reason="first")
    store.rival = json.dumps({
        "seq": 2, "from": 1, "to": 3, "sha256": registry.get(3).weights_sha256, "previous": 1,
        "reason": "rival", "forced": False, "time": "2026-01-01T00:00:00.000+00:00",
        "writer": "rival"}).encode()
    state = registry.set_alias("production", 2, reason="ours")
    history = registry.history()
    assert [(h["seq"], h["from"], h["to"], h["reason"]) for h in history] == [
        (1, None, 1, "first"), (2, 1, 3, "rival"), (3, 3, 2, "ours")]
    assert (state.version, state.seq, state.previous) == (2, 3, 3)
    assert_consistent(history, registry.alias())


# --------------------------------------------------------------------------------------------
# Races: many writers move one alias at once


VERSIONS = 4


def race_target(worker: int, round_: int) -> int:
    return (worker + round_) % VERSIONS + 1


def race_reason(worker: int, round_: int) -> str:
    return f"race w{worker} r{round_}"


def assert_consistent(history: list[dict], alias: AliasState | None) -> None:
    """Gap-free seqs, each move chained on the previous one, the alias equal to the last move."""
    assert [h["seq"] for h in history] == list(range(1, len(history) + 1))
    for before, after in zip(history, history[1:], strict=False):
        assert after["from"] == before["to"], (before, after)
    assert alias is not None
    assert (alias.seq, alias.version, alias.sha256) == (history[-1]["seq"], history[-1]["to"],
                                                        history[-1]["sha256"])


def assert_race_result(registry: Registry, workers: int, rounds: int) -> None:
    history = registry.history("production")
    assert_consistent(history, registry.alias("production"))
    assert len(history) == workers * rounds
    moves = Counter((h["reason"], h["to"]) for h in history)
    expected = Counter((race_reason(w, r), race_target(w, r))
                       for w in range(workers) for r in range(rounds))
    assert moves == expected  # every attempted move exactly once, to the version it asked for


def setup_race(store: Store) -> Registry:
    registry = Registry(store, MODEL)
    for seed in range(1, VERSIONS + 1):
        registry.register(weights(seed), card(0.96))
    return registry


def race(registry: Registry, barrier: threading.Barrier | multiprocessing.synchronize.Barrier,
         worker: int, rounds: int) -> None:
    for round_ in range(rounds):
        barrier.wait(timeout=60)  # everyone starts each round together: maximum contention
        registry.set_alias("production", race_target(worker, round_),
                           reason=race_reason(worker, round_))


def test_concurrent_alias_moves_from_threads(store: Store) -> None:
    workers, rounds = 4, 3  # each round a four-way race for the next history slot
    registry = setup_race(store)
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            race(Registry(store, MODEL), barrier, worker, rounds)
        except BaseException as error:  # surface it in the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert_race_result(registry, workers, rounds)


def open_spec(spec: tuple[str, ...]) -> Store:
    """Each process builds its own store: a client or file handle is never shared."""
    if spec[0] == "local":
        return LocalStore(spec[1])
    _, bucket, prefix, endpoint = spec
    return S3Store(bucket, prefix, S3Options(endpoint_url=endpoint, addressing_style="path"))


def race_process(spec: tuple[str, ...], barrier: multiprocessing.synchronize.Barrier,
                 worker: int, rounds: int) -> None:
    race(Registry(open_spec(spec), MODEL), barrier, worker, rounds)


@pytest.fixture(scope="module")
def race_processes() -> Iterator[multiprocessing.context.BaseContext]:
    """Where the race's worker processes start: a forkserver that imported this module (the
    registry, boto3) once, so that each worker, a process of its own with its own store, does
    not spend a second importing them again as a spawned one would. Stopped (and reaped) after
    the module, so that the next user of a forkserver in this process starts its own with what
    it preloads (tests/flows/conftest.py's Dask cluster)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    yield context
    stop_forkserver()


@pytest.mark.slow  # worker processes
def test_concurrent_alias_moves_from_processes(
        store: Store, race_processes: multiprocessing.context.BaseContext) -> None:
    workers, rounds = 3, 3  # each round a three-way race
    registry = setup_race(store)
    if isinstance(store, LocalStore):
        spec: tuple[str, ...] = ("local", str(store.root))
    else:
        assert isinstance(store, S3Store)
        spec = ("s3", store.bucket, store.prefix, store.endpoint)
    context = race_processes
    barrier = context.Barrier(workers)
    processes = [context.Process(target=race_process, args=(spec, barrier, w, rounds))
                 for w in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=120)
        assert [p.exitcode for p in processes] == [0] * workers
    finally:
        for process in processes:  # only a hung worker is still alive here
            if process.is_alive():
                process.kill()
                process.join()
    assert_race_result(registry, workers, rounds)


# The same races on a real S3 server: SeaweedFS checks IfMatch/IfNoneMatch under a lock.


@pytest.mark.slow  # a SeaweedFS server process
def test_concurrent_alias_moves_from_threads_on_seaweedfs(seaweedfs_store: S3Store) -> None:
    test_concurrent_alias_moves_from_threads(seaweedfs_store)


@pytest.mark.slow  # a SeaweedFS server process and worker processes
def test_concurrent_alias_moves_from_processes_on_seaweedfs(
        seaweedfs_store: S3Store, race_processes: multiprocessing.context.BaseContext) -> None:
    test_concurrent_alias_moves_from_processes(seaweedfs_store, race_processes)


# --------------------------------------------------------------------------------------------
# The alias and history documents


def test_alias_and_history_documents_round_trip_byte_for_byte() -> None:
    from flowerml.core.documents import plain, read_document
    from flowerml.core.files import json_bytes
    from flowerml.registry.aliases import AliasRecord, HistoryEntry
    from tests.helpers.stored_documents import fixture_bytes

    for name, model in (("alias.json", AliasRecord), ("history-entry.json", HistoryEntry)):
        raw = fixture_bytes(name)  # as written before the models
        assert json_bytes(plain(read_document(model, raw, name))) == raw


def test_history_entries_from_before_rollback_existed_still_read(local_store: LocalStore
                                                                 ) -> None:
    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.96))
    registry.set_alias("production", 1, reason="first")
    registry.set_alias("production", 1, reason="rollback to v1")
    for seq in (1, 2):
        key = f"registry/{MODEL}/aliases/production/history/{seq:08d}.json"
        entry = json.loads(local_store.get_bytes(key))
        del entry["rollback"]  # as written before the field existed
        local_store.put_bytes(key, json.dumps(entry).encode())
    history = registry.history()
    assert [("rollback" in h, is_rollback(h)) for h in history] == [(False, False),
                                                                    (False, True)]


@pytest.mark.parametrize(("name", "change", "field"), [
    ("production.json", lambda d: d.update(seq="1"),
     "seq: Input should be a valid integer (got '1')"),
    ("production.json", lambda d: d.pop("sha256"), "sha256: Field required"),
    ("production/history/00000001.json", lambda d: d.update({"from": "none"}),
     "from: Input should be a valid integer (got 'none')"),
    ("production/history/00000001.json", lambda d: d.update(seq=0),
     "seq: Input should be greater than or equal to 1 (got 0)"),
])
def test_an_edited_alias_or_history_entry_is_one_line_naming_file_and_field(
        local_store: LocalStore, name: str, change, field: str) -> None:
    from flowerml.registry.aliases import DamagedRegistryDocument

    registry = Registry(local_store, MODEL)
    registry.register(weights(1), card(0.96))
    registry.set_alias("production", 1, reason="first")
    key = f"registry/{MODEL}/aliases/{name}"
    document = json.loads(local_store.get_bytes(key))
    change(document)
    local_store.put_bytes(key, json.dumps(document).encode())
    with pytest.raises(DamagedRegistryDocument) as caught:
        registry.history() if "history" in name else registry.alias()
    assert str(caught.value) == f"{key}: field {field}"
