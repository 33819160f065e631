"""flowerml.serving.scoring_plan's stored documents: `_shards/NNNNN.json` and `_listing.json`
are written through their models (the bytes they had before) and read validated, so a damaged
or edited one is one line naming the file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.core.documents import plain
from flowerml.io.storage_local import LocalStore
from flowerml.serving.inputs import list_input
from flowerml.serving.scoring_plan import (
    LISTING,
    DamagedScoringDocument,
    ScoringError,
    ScoringPlan,
    read_listing,
    read_shard,
    write_shards,
)
from flowerml.serving.scoring_spool import LISTING_FORMAT, spool_listing

SHARD_SIZE = 2


@pytest.fixture
def written(local_store: LocalStore, tmp_path: Path) -> ScoringPlan:
    """A listing of three photos in two shards, written to the store as plan_scoring does."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(b"not decoded here")
    listing = list_input(str(photos), None)
    spooled = spool_listing(listing, SHARD_SIZE, tmp_path)
    input_id = spooled.digest[:16]
    plan = ScoringPlan(format=1, input=str(photos), root=listing.root, input_id=input_id, images=3,
                       shards=2, shard_size=SHARD_SIZE, model="flowers102", version=1,
                       runtime="torch", sha256="1" * 64, weights_sha256="2" * 64, top_k=5,
                       batch_size=4, registry="file:///registry", output=local_store.uri,
                       prefix=f"flowers102/000001/{input_id}")
    write_shards(local_store, plan, spooled, "out")
    return plan


def test_listing_and_shards_read_back_as_written(local_store: LocalStore,
                                                 written: ScoringPlan) -> None:
    assert plain(read_listing(local_store, written.prefix, "out")) == {
        "format": LISTING_FORMAT, "input": written.input, "root": written.root,
        "input_id": written.input_id, "images": 3, "shards": 2, "shard_size": SHARD_SIZE,
        "model": "flowers102", "version": 1, "runtime": "torch", "top_k": 5}
    assert read_shard(local_store, written, 0) == ["a.jpg", "b.jpg"]
    assert read_shard(local_store, written, 1) == ["c.jpg"]
    assert local_store.get_bytes(written.shard_key(1)) == b'{"shard": 1, "keys": ["c.jpg"]}'


def test_no_listing_yet_is_none(local_store: LocalStore) -> None:
    assert read_listing(local_store, "flowers102/000001/0123456789abcdef", "out") is None


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r.update(top_k="5"), "field top_k: Input should be a valid integer (got '5')"),
    (lambda r: r.pop("runtime"), "field runtime: Field required"),
])
def test_an_edited_listing_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                             written: ScoringPlan, change,
                                                             problem: str) -> None:
    key = written.key(LISTING)
    record = json.loads(local_store.get_bytes(key))
    change(record)
    local_store.put_bytes(key, json.dumps(record).encode())
    with pytest.raises(DamagedScoringDocument) as caught:
        read_listing(local_store, written.prefix, "out")
    assert str(caught.value) == (f"{local_store.root}/{key}: {problem}: remove that folder, "
                                 "or use another --output")
    assert isinstance(caught.value, ScoringError)


def test_a_truncated_listing_is_one_line(local_store: LocalStore, written: ScoringPlan) -> None:
    key = written.key(LISTING)
    local_store.put_bytes(key, local_store.get_bytes(key)[:20])
    with pytest.raises(DamagedScoringDocument) as caught:
        read_listing(local_store, written.prefix, "out")
    assert str(caught.value) == (f"{local_store.root}/{key}: not valid JSON (EOF while "
                                 "parsing a string at line 3 column 3): remove that folder, "
                                 "or use another --output")


def test_an_edited_shard_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                           written: ScoringPlan) -> None:
    key = written.shard_key(0)
    local_store.put_bytes(key, json.dumps({"shard": 0, "keys": ["a.jpg", 7]}).encode())
    with pytest.raises(DamagedScoringDocument) as caught:
        read_shard(local_store, written, 0)
    assert str(caught.value) == (f"{local_store.root}/{key}: field keys.1: Input should be a "
                                 "valid string (got 7)")
