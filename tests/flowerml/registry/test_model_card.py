"""flowerml.registry.model_card: card.json written and read through ModelCard by the registry; an edited
card is one line naming the file and the field (exit 2 from the CLI); cards written before the
model still read."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save

from flowerml.cli import cli
from flowerml.core.documents import DocumentError, plain, read_document
from flowerml.core.files import json_bytes
from flowerml.io.storage_local import LocalStore
from flowerml.registry.aliases import DamagedRegistryDocument
from flowerml.registry.model_card import ModelCard
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import Registry
from tests.helpers.stored_documents import fixture_bytes

CARD_KEY = "registry/tulips/versions/000001/card.json"


def registered(store: LocalStore, card: dict) -> Registry:
    registry = Registry(store, "tulips")
    registry.register(save({"w": torch.zeros(2)}), card)
    return registry


def release_card() -> dict:
    """The caller's part of the fixture card (what release.build_card handed the registry)."""
    card = json.loads(fixture_bytes("card.json"))
    for field in ("version", "model", "weights_sha256", "registered_at"):
        del card[field]
    return card


def test_card_round_trips_byte_for_byte() -> None:
    raw = fixture_bytes("card.json")  # as the registry wrote it before the model
    card = read_document(ModelCard, raw, CARD_KEY)
    assert card.metrics.top1 == 0.75 and card.lineage.run_id == "run-1"
    assert json_bytes(plain(card)) == raw


def test_registered_card_reads_back_as_written(local_store: LocalStore) -> None:
    registry = registered(local_store, release_card())
    stored = json.loads(local_store.get_bytes(CARD_KEY))
    assert registry.get(1).card == stored
    assert {k: v for k, v in stored.items() if k not in ModelCard.model_fields
            or k in release_card()} == release_card()


def test_a_partial_card_from_an_older_tool_still_reads(local_store: LocalStore) -> None:
    card = {"metrics": {"top1": 0.9, "top5": 0.99, "loss": 0.2}, "test_manifest_sha256": "ab" * 32,
            "run_id": "run-1", "backbone": "resnet152"}
    registry = registered(local_store, card)
    assert registry.get(1).card["backbone"] == "resnet152"  # undeclared fields are kept
    assert "arch" not in registry.get(1).card  # absent stays absent, not null


def edit_card(store: LocalStore, change) -> None:
    card = json.loads(store.get_bytes(CARD_KEY))
    change(card)
    store.put_bytes(CARD_KEY, json.dumps(card).encode())


@pytest.mark.parametrize(("change", "field"), [
    (lambda c: c["metrics"].update(top1="high"),
     "metrics.top1: Input should be a valid number (got 'high')"),
    (lambda c: c["classes"][1].pop("name"), "classes.1.name: Field required"),
    (lambda c: c.update(weights_sha256="abc"),
     "weights_sha256: String should match pattern '^[0-9a-f]{64}$' (got 'abc')"),
    (lambda c: c.pop("version"), "version: Field required"),
])
def test_an_edited_card_is_one_line_naming_file_and_field(local_store: LocalStore, change,
                                                           field: str) -> None:
    registry = registered(local_store, release_card())
    edit_card(local_store, change)
    with pytest.raises(DamagedRegistryDocument) as caught:
        registry.get(1)
    assert str(caught.value) == f"{CARD_KEY}: field {field}"
    assert isinstance(caught.value, DocumentError) and isinstance(caught.value, RegistryError)


def test_the_cli_prints_the_one_line_and_exits_2(local_store: LocalStore) -> None:
    registered(local_store, release_card())
    edit_card(local_store, lambda c: c["lineage"].update(best_epoch="one"))
    result = CliRunner().invoke(cli, ["registry", "show", "tulips"],
                                env={"FLOWERML_STORE": str(local_store.root)})
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"flowerml: error: {CARD_KEY}: field lineage.best_epoch: Input "
                             "should be a valid integer (got 'one')\n")


def test_a_card_that_would_not_read_back_is_refused_before_anything_is_written(
        local_store: LocalStore) -> None:
    with pytest.raises(RegistryError) as caught:
        registered(local_store, {**release_card(), "image_size": "48"})
    assert str(caught.value) == ("the model card: field image_size: Input should be a valid "
                                 "integer (got '48')")
    assert list(local_store.list("registry/")) == []


def test_loading_a_version_whose_card_lacks_a_model_field_names_it(local_store: LocalStore
                                                                   ) -> None:
    from flowerml.registry.release import load_version

    registry = registered(local_store, {k: v for k, v in release_card().items()
                                        if k != "image_size"})
    with pytest.raises(DamagedRegistryDocument) as caught:
        load_version(registry, 1)
    assert str(caught.value) == (f"{CARD_KEY}: field image_size: absent: a version's card "
                                 "needs it to load the model")
