"""flowerml.registry.versions: versions committed last, checksums, names in lookups, and the values it
hands out (aliases are tested in test_registry_aliases.py, the gates in test_gates.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from flowerml.core.documents import read_document
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.registry.gates import Scorecard
from flowerml.registry.names import RegistryError
from flowerml.registry.promotion import promote
from flowerml.registry.versions import Claim, ModelVersion, Registry, list_models, resolve_ref
from tests.helpers.registry_entries import MANIFEST, MODEL, card, weights


def keys(store: Store, prefix: str) -> list[str]:
    return [info.key[len(prefix):] for info in store.list(prefix)]


def vkey(version: int, name: str) -> str:
    return f"registry/{MODEL}/versions/{version:06d}/{name}"


# --------------------------------------------------------------------------------------------
# Versions


def test_register_writes_numbered_versions_with_card_and_files(store: Store,
                                                               tmp_path: Path) -> None:
    from flowerml.registry.release import render_card

    registry = Registry(store, MODEL)
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"\x89PNG fake")
    first = registry.register(weights(1), card(0.96),
                              {"report.md": b"# report\n", "curves.png": plot},
                              render=render_card)
    second = registry.register(weights(2), card(0.97))
    third = registry.register(weights(3), card(0.98))
    assert [first.version, second.version, third.version] == [1, 2, 3]
    assert first.label == "flowers102:000001" and first.committed
    assert keys(store, vkey(1, "")) == ["CLAIM", "COMMITTED", "card.json", "card.md",
                                        "curves.png", "model.safetensors", "report.md"]
    assert store.get_bytes(vkey(1, "curves.png")) == b"\x89PNG fake"

    stored = json.loads(store.get_bytes(vkey(1, "card.json")))
    assert stored["version"] == 1 and stored["model"] == MODEL
    assert stored["weights_sha256"] == first.weights_sha256
    assert stored["metrics"]["top1"] == 0.96 and "registered_at" in stored
    committed = json.loads(store.get_bytes(vkey(1, "COMMITTED")))
    assert committed["weights_sha256"] == first.weights_sha256 and "committed_at" in committed
    claim = read_document(Claim, store.get_bytes(vkey(1, "CLAIM")), "CLAIM")
    assert len(claim.token) == 32 and claim.claimed_at.startswith("20")

    readable = store.get_bytes(vkey(1, "card.md")).decode()
    assert readable.startswith("# flowers102 v000001")
    assert "| top1 | 0.96 |" in readable and "## Metrics" in readable
    assert "[report.md](report.md)" in readable
    assert [v.version for v in registry.versions()] == [1, 2, 3]
    assert registry.get(2).card["metrics"]["top1"] == 0.97


def test_load_weights_round_trips(store: Store) -> None:
    import torch

    registry = Registry(store, MODEL)
    version = registry.register(weights(7), card(0.96)).version
    loaded = registry.load_weights(version)
    assert loaded.keys() == weights(7).keys()
    for name, tensor in weights(7).items():
        assert torch.equal(loaded[name], tensor)


def test_register_accepts_safetensors_bytes_and_refuses_pickles(local_store: LocalStore) -> None:
    import torch
    from safetensors.torch import save

    registry = Registry(local_store, MODEL)
    version = registry.register(save(weights(1)), card(0.96)).version
    assert torch.equal(registry.load_weights(version)["fc.bias"], weights(1)["fc.bias"])
    with pytest.raises(RegistryError, match="pickle or other format is refused"):
        registry.register(pickle.dumps(weights(2)), card(0.96))
    with pytest.raises(RegistryError, match="extra file name 'COMMITTED' is not allowed"):
        registry.register(weights(2), card(0.96), {"COMMITTED": b"{}"})
    with pytest.raises(RegistryError, match="extra file name '../x' is not allowed"):
        registry.register(weights(2), card(0.96), {"../x": b""})
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        registry.register(weights(2), {"when": object()})
    # Bad input is refused before a number is claimed: nothing half-written.
    assert [v.version for v in registry.versions()] == [1]


def crash_before_commit(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next registration stops just before COMMITTED, as a killed process would."""

    def crash(version: int, sha: str) -> None:
        raise RuntimeError(f"simulated crash before committing version {version:06d}")

    monkeypatch.setattr(registry, "_commit", crash)


def test_interrupted_registration_is_never_committed_nor_promoted(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(store, MODEL)
    registry.register(weights(1), card(0.96))
    promote(registry, 1, scorecard=Scorecard(0.96, MANIFEST))
    crashing = Registry(store, MODEL)
    crash_before_commit(crashing, monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.register(weights(2), card(0.99))

    assert not store.exists(vkey(2, "COMMITTED"))
    assert store.exists(vkey(2, "model.safetensors"))
    assert [(v.version, v.committed) for v in registry.versions()] == [(1, True), (2, False)]
    message = ("flowers102 version 000002 is not COMMITTED (an interrupted registration); "
               "it cannot be promoted or loaded")
    with pytest.raises(RegistryError) as caught:
        registry.require_committed(2)
    assert str(caught.value) == message
    for attempt in (lambda: promote(registry, 2, scorecard=Scorecard(0.99, MANIFEST)),
                    lambda: registry.set_alias("production", 2, reason="manual"),
                    lambda: registry.load_weights(2),
                    lambda: registry.resolve(version=2)):
        with pytest.raises(RegistryError, match="not COMMITTED"):
            attempt()
    assert registry.alias().version == 1 and len(registry.history()) == 1
    assert registry.register(weights(3), card(0.97)).version == 3  # the number stays used


def test_tampered_weights_fail_their_checksum_and_move_no_alias(store: Store) -> None:
    from safetensors.torch import save

    registry = Registry(store, MODEL)
    registry.register(weights(1), card(0.96))
    registry.register(weights(2), card(0.97))
    promote(registry, 1, scorecard=Scorecard(0.96, MANIFEST))
    store.put_bytes(vkey(2, "model.safetensors"), save(weights(99)))  # valid file, wrong bytes

    for attempt in (lambda: registry.load_weights(2), lambda: registry.verify(2),
                    lambda: registry.set_alias("production", 2, reason="manual"),
                    lambda: promote(registry, 2, scorecard=Scorecard(0.97, MANIFEST))):
        with pytest.raises(RegistryError, match="version 000002: weights fail their checksum"):
            attempt()
    registry.verify(1)
    assert registry.alias().version == 1 and len(registry.history()) == 1


# --------------------------------------------------------------------------------------------
# Lookups and values


def test_unknown_and_bad_names_are_named(store: Store) -> None:
    with pytest.raises(RegistryError, match="model name must be .* \\(got 'Flowers 102'\\)"):
        Registry(store, "Flowers 102")
    registry = Registry(store, MODEL)
    with pytest.raises(RegistryError, match="flowers102 has no version 000009"):
        registry.get(9)
    with pytest.raises(RegistryError, match="flowers102 has no alias 'staging'"):
        registry.resolve("staging")
    with pytest.raises(RegistryError, match="alias name must be .*'Prod!'"):
        registry.alias("Prod!")
    with pytest.raises(RegistryError, match="no alias 'production'"):
        resolve_ref(store, "tulips")
    with pytest.raises(RegistryError, match="tulips has no version 000003"):
        resolve_ref(store, "tulips:3")
    registry.register(weights(1), card(0.96))
    with pytest.raises(RegistryError, match="version 000005"):
        registry.set_alias("production", 5, reason="manual")
    with pytest.raises(RegistryError, match="alias or a version, not both"):
        registry.resolve("production", 1)


def test_list_models(store: Store) -> None:
    assert list_models(store) == []
    Registry(store, "tulips").register(weights(1), card(0.9))
    Registry(store, MODEL).register(weights(1), card(0.9))
    assert list_models(store) == ["flowers102", "tulips"]


def test_values_are_frozen() -> None:
    version = ModelVersion(MODEL, 3, {}, "0" * 64, True)
    assert version.label == "flowers102:000003"
    with pytest.raises(AttributeError):
        version.version = 4  # type: ignore[misc]
