"""flowerml.runs: a run's files on a real store, every read checksum-verified."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from flowerml.errors import UserError
from flowerml.runs import RunError, RunFiles, check_run_id
from flowerml.storage import LocalStore, Store


class RecordingStore(LocalStore):
    """A real LocalStore that remembers the order of its writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kwargs) -> str:  # type: ignore[override]
        self.writes.append(key)
        return super().put_bytes(key, data, **kwargs)


@pytest.fixture
def run(local_store: LocalStore) -> RunFiles:
    return RunFiles(local_store, "run-1")


def _state() -> dict:
    torch.manual_seed(0)
    return {"model": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 2, "best_top1": 0.5}


# --- run ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["run-1", "a", "2024.05.01_retrain", "A" * 128])
def test_valid_run_ids(run_id: str):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["", "../x", "a/b", "-leading", ".hidden", "sp ace",
                                    "A" * 129, "run\n"])
def test_invalid_run_ids_are_refused_in_one_line(run_id: str):
    with pytest.raises(RunError) as err:
        check_run_id(run_id)
    assert str(err.value) == (
        f"--run-id must be letters, digits, '.', '_' or '-' (got {run_id!r})")
    assert isinstance(err.value, UserError)


# --- JSON files ----------------------------------------------------------------------------


def test_keys_live_under_runs(run: RunFiles):
    assert run.key("config.json") == "runs/run-1/config.json"


def test_exists_follows_config_json(run: RunFiles, local_store: LocalStore):
    assert not run.exists()
    run.write_json("result.json", {"done": True})
    assert not run.exists()  # only config.json makes a run
    run.write_json("config.json", {"arch": "resnet18"})
    assert run.exists()
    assert json.loads(local_store.get_bytes("runs/run-1/config.json")) == {"arch": "resnet18"}


def test_json_round_trip_on_both_stores(store: Store):
    run = RunFiles(store, "both")
    run.write_json("config.json", {"epochs": 3, "name": "ü"})
    assert run.read_json("config.json") == {"epochs": 3, "name": "ü"}


def test_missing_json_names_the_run_and_store(run: RunFiles, local_store: LocalStore):
    with pytest.raises(RunError) as err:
        run.read_json("result.json")
    assert str(err.value) == f"run 'run-1' has no result.json on {local_store.uri}"


def test_invalid_json_names_the_key(run: RunFiles, local_store: LocalStore):
    local_store.put_bytes("runs/run-1/config.json", b"{half")
    with pytest.raises(RunError, match=r"^runs/run-1/config.json: is not valid JSON$"):
        run.read_json("config.json")


def test_history_is_one_sorted_json_line_per_epoch(run: RunFiles, local_store: LocalStore):
    run.write_history([{"epoch": 1, "loss": 2.0}, {"loss": 1.5, "epoch": 2}])
    lines = local_store.get_bytes("runs/run-1/metrics.jsonl").decode().splitlines()
    assert lines == ['{"epoch": 1, "loss": 2.0}', '{"epoch": 2, "loss": 1.5}']


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip_and_its_pointer(store: Store):
    run = RunFiles(store, "ckpt")
    assert not run.has_checkpoint()

    run.save_checkpoint(_state(), epoch=2)

    assert run.has_checkpoint()
    loaded = run.load_checkpoint()
    assert torch.equal(loaded["model"]["fc.weight"], _state()["model"]["fc.weight"])
    assert loaded["optimizer"] == _state()["optimizer"]
    assert (loaded["epoch"], loaded["best_top1"]) == (2, 0.5)
    blob = store.get_bytes("runs/ckpt/checkpoint.pt")
    assert run.read_json("checkpoint.json") == {
        "key": "checkpoint.pt", "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
        "epoch": 2}


def test_the_pointer_is_written_after_the_blob(tmp_path: Path):
    store = RecordingStore(tmp_path / "store")
    run = RunFiles(store, "order")
    run.save_checkpoint(_state(), epoch=1)
    run.save_weights({"w": torch.ones(2)})
    assert store.writes == ["runs/order/checkpoint.pt", "runs/order/checkpoint.json",
                            "runs/order/best.safetensors", "runs/order/best.json"]


def test_a_corrupt_checkpoint_is_refused(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    blob = bytearray(local_store.get_bytes("runs/run-1/checkpoint.pt"))
    blob[len(blob) // 2] ^= 0xFF
    local_store.put_bytes("runs/run-1/checkpoint.pt", bytes(blob))

    with pytest.raises(RunError) as err:
        run.load_checkpoint()
    assert str(err.value) == ("runs/run-1/checkpoint.pt: sha256 mismatch "
                              "(the file is corrupt or truncated)")


def test_a_truncated_checkpoint_is_refused(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    blob = local_store.get_bytes("runs/run-1/checkpoint.pt")
    local_store.put_bytes("runs/run-1/checkpoint.pt", blob[:100])
    with pytest.raises(RunError, match="sha256 mismatch"):
        run.load_checkpoint()


def test_a_checkpoint_named_but_missing(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    local_store.delete("runs/run-1/checkpoint.pt")
    with pytest.raises(RunError) as err:
        run.load_checkpoint()
    assert str(err.value) == "runs/run-1/checkpoint.pt: missing (named by checkpoint.json)"


def test_no_checkpoint_at_all(run: RunFiles):
    with pytest.raises(RunError, match="run 'run-1' has no checkpoint.json"):
        run.load_checkpoint()


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_code_in_it_is_not_unpickled(run: RunFiles, local_store: LocalStore,
                                                       tmp_path: Path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "evil": _Payload(marker)}, buffer)
    data = buffer.getvalue()
    # A consistent pair, as if written by someone else: the checksum alone would pass it.
    local_store.put_bytes("runs/run-1/checkpoint.pt", data)
    run.write_json("checkpoint.json", {"key": "checkpoint.pt", "size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest(), "epoch": 1})

    with pytest.raises(RunError) as err:
        run.load_checkpoint()

    assert str(err.value).startswith("runs/run-1/checkpoint.pt: cannot be loaded (")
    assert not marker.exists()


# --- best weights --------------------------------------------------------------------------


def test_weights_round_trip_with_their_record(store: Store):
    run = RunFiles(store, "weights")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"fc.weight": base.t(),  # not contiguous
               "fc.bias": torch.ones(4, requires_grad=True)}

    digest = run.save_weights(tensors, epoch=4, top1=0.75)

    data = run.read_weights_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    loaded, record = run.load_weights()
    assert torch.equal(loaded["fc.weight"], base.t())
    assert torch.equal(loaded["fc.bias"], torch.ones(4))
    assert record == {"key": "best.safetensors", "sha256": digest, "size": len(data),
                      "epoch": 4, "top1": 0.75}


def test_corrupt_weights_are_refused(run: RunFiles, local_store: LocalStore):
    run.save_weights({"w": torch.ones(8)})
    data = bytearray(local_store.get_bytes("runs/run-1/best.safetensors"))
    data[-1] ^= 0x01
    local_store.put_bytes("runs/run-1/best.safetensors", bytes(data))
    with pytest.raises(RunError, match=r"^runs/run-1/best.safetensors: sha256 mismatch"):
        run.read_weights_bytes()
    with pytest.raises(RunError, match="sha256 mismatch"):
        run.load_weights()


def test_weights_that_are_not_safetensors_are_refused(run: RunFiles, local_store: LocalStore):
    junk = b"not safetensors at all"
    local_store.put_bytes("runs/run-1/best.safetensors", junk)
    run.write_json("best.json", {"key": "best.safetensors", "size": len(junk),
                                 "sha256": hashlib.sha256(junk).hexdigest()})
    with pytest.raises(RunError, match=r"^runs/run-1/best.safetensors: cannot be loaded \("):
        run.load_weights()
