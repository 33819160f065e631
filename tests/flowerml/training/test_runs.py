"""flowerml.training.runs: a run's files on a real store, every read checksum-verified."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from flowerml.core.errors import UserError
from flowerml.io.storage import Store
from flowerml.io.storage_local import LocalStore
from flowerml.training.runs import (
    DamagedRunFile,
    RunError,
    RunFiles,
    RunNotFound,
    RunRecord,
    check_run_id,
    run_ids,
)
from tests.helpers.stored_documents import fixture_bytes


class RecordingStore(LocalStore):
    """A real LocalStore that remembers the order of its writes and deletes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kwargs) -> str:  # type: ignore[override]
        self.writes.append(key)
        return super().put_bytes(key, data, **kwargs)

    def delete(self, key: str) -> None:
        self.writes.append(f"delete {key}")
        super().delete(key)


class Killed(BaseException):
    """The process dies here: nothing after this point of a save happens."""


@pytest.fixture
def run(local_store: LocalStore) -> RunFiles:
    return RunFiles(local_store, "run-1")


def _state(epoch: int = 2) -> dict:
    torch.manual_seed(epoch - 2)  # epoch 2 is the state every test used before generations
    return {"model": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": epoch, "best_top1": 0.5}


def _blobs(store: Store, run: RunFiles, stem: str) -> list[str]:
    """The run's blob keys of one kind (`checkpoint` or `best`), pointers excluded."""
    return [info.key for info in store.list(run.key(stem)) if not info.key.endswith(".json")]


def _kill_on(monkeypatch: pytest.MonkeyPatch, store: Store, method: str, suffix: str) -> None:
    """Make `store.<method>(key)` die for keys ending in `suffix` (the process is gone)."""
    original = getattr(store, method)

    def dying(key: str, *args, **kwargs):
        if key.endswith(suffix):
            raise Killed(key)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(store, method, dying)


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
    key = run.checkpoint_key()
    blob = store.get_bytes(key)
    digest = hashlib.sha256(blob).hexdigest()
    assert key == f"runs/ckpt/checkpoint-{digest[:16]}.pt"  # content-addressed
    assert run.read_json("checkpoint.json") == {
        "key": f"checkpoint-{digest[:16]}.pt", "sha256": digest, "size": len(blob), "epoch": 2}
    assert _blobs(store, run, "checkpoint") == [key]


def test_the_pointer_is_written_after_the_blob(tmp_path: Path):
    """Each generation's blob under its own key, then its pointer, then the previous
    generation's blob deleted: never the other way round."""
    store = RecordingStore(tmp_path / "store")
    run = RunFiles(store, "order")
    run.save_checkpoint(_state(), epoch=1)
    run.save_weights({"w": torch.ones(2)})
    first = run.checkpoint_key(), run.weights_key()
    assert store.writes == [first[0], "runs/order/checkpoint.json",
                            first[1], "runs/order/best.json"]

    store.writes.clear()
    run.save_checkpoint(_state(3), epoch=2)
    run.save_weights({"w": torch.zeros(2)})
    second = run.checkpoint_key(), run.weights_key()
    assert second[0] != first[0] and second[1] != first[1]
    assert store.writes == [second[0], "runs/order/checkpoint.json", f"delete {first[0]}",
                            second[1], "runs/order/best.json", f"delete {first[1]}"]


def test_a_corrupt_checkpoint_is_refused(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    key = run.checkpoint_key()
    blob = bytearray(local_store.get_bytes(key))
    blob[len(blob) // 2] ^= 0xFF
    local_store.put_bytes(key, bytes(blob))

    with pytest.raises(RunError) as err:
        run.load_checkpoint()
    assert str(err.value) == f"{key}: sha256 mismatch (the file is corrupt or truncated)"


def test_a_truncated_checkpoint_is_refused(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    key = run.checkpoint_key()
    local_store.put_bytes(key, local_store.get_bytes(key)[:100])
    with pytest.raises(RunError, match="sha256 mismatch"):
        run.load_checkpoint()


def test_a_checkpoint_named_but_missing(run: RunFiles, local_store: LocalStore):
    run.save_checkpoint(_state(), epoch=2)
    key = run.checkpoint_key()
    local_store.delete(key)
    with pytest.raises(RunError) as err:
        run.load_checkpoint()
    assert str(err.value) == f"{key}: missing (named by checkpoint.json)"


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
    assert record == {"key": f"best-{digest[:16]}.safetensors", "sha256": digest,
                      "size": len(data), "epoch": 4, "top1": 0.75}
    assert _blobs(store, run, "best") == [run.weights_key()] == [
        f"runs/weights/best-{digest[:16]}.safetensors"]


def test_corrupt_weights_are_refused(run: RunFiles, local_store: LocalStore):
    run.save_weights({"w": torch.ones(8)})
    key = run.weights_key()
    data = bytearray(local_store.get_bytes(key))
    data[-1] ^= 0x01
    local_store.put_bytes(key, bytes(data))
    with pytest.raises(RunError, match=rf"^{re.escape(key)}: sha256 mismatch"):
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


# --- a save killed part-way (SIGKILL, OOM, a lost host) -------------------------------------


def _assert_state(loaded: dict, epoch: int) -> None:
    expected = _state(epoch)
    assert loaded["epoch"] == epoch
    assert torch.equal(loaded["model"]["fc.weight"], expected["model"]["fc.weight"])


def test_a_kill_between_blob_and_pointer_resumes_the_previous_checkpoint(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    """Generation N+1's blob is written, the process dies before its pointer: the pointer
    still names generation N, intact, so an unattended resume loads N; the next full save
    leaves exactly one checkpoint blob, N+1's."""
    run = RunFiles(store, "killed")
    run.save_checkpoint(_state(7), epoch=7)
    generation_n = run.checkpoint_key()

    with monkeypatch.context() as patch:
        _kill_on(patch, store, "put_bytes", "/checkpoint.json")
        with pytest.raises(Killed):
            run.save_checkpoint(_state(8), epoch=8)
    assert len(_blobs(store, run, "checkpoint")) == 2  # N+1's blob landed: one orphan

    assert run.checkpoint_key() == generation_n
    assert run.read_json("checkpoint.json")["epoch"] == 7
    _assert_state(run.load_checkpoint(), 7)

    run.save_checkpoint(_state(8), epoch=8)  # the resumed run saves N+1 again, in full
    assert _blobs(store, run, "checkpoint") == [run.checkpoint_key()]
    assert run.checkpoint_key() != generation_n
    _assert_state(run.load_checkpoint(), 8)


def test_a_kill_after_the_pointer_leaves_one_orphan_the_next_save_removes(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    run = RunFiles(store, "killed-late")
    run.save_checkpoint(_state(7), epoch=7)
    generation_n = run.checkpoint_key()

    with monkeypatch.context() as patch:
        _kill_on(patch, store, "delete", ".pt")  # pointer written, N's blob not yet deleted
        with pytest.raises(Killed):
            run.save_checkpoint(_state(8), epoch=8)
    assert sorted(_blobs(store, run, "checkpoint")) == sorted([generation_n,
                                                               run.checkpoint_key()])
    _assert_state(run.load_checkpoint(), 8)

    run.save_checkpoint(_state(9), epoch=9)
    assert _blobs(store, run, "checkpoint") == [run.checkpoint_key()]
    _assert_state(run.load_checkpoint(), 9)


def test_a_kill_between_best_weights_and_their_pointer(store: Store,
                                                        monkeypatch: pytest.MonkeyPatch):
    run = RunFiles(store, "killed-best")
    digest = run.save_weights({"w": torch.ones(4)}, epoch=5)

    with monkeypatch.context() as patch:
        _kill_on(patch, store, "put_bytes", "/best.json")
        with pytest.raises(Killed):
            run.save_weights({"w": torch.zeros(4)}, epoch=6)

    tensors, record = run.load_weights()
    assert torch.equal(tensors["w"], torch.ones(4))
    assert (record["sha256"], record["epoch"]) == (digest, 5)

    run.save_weights({"w": torch.zeros(4)}, epoch=6)
    assert _blobs(store, run, "best") == [run.weights_key()]
    assert torch.equal(run.load_weights()[0]["w"], torch.zeros(4))


def test_a_pre_generation_run_resumes_and_its_fixed_name_blob_is_removed(
        run: RunFiles, local_store: LocalStore):
    """A run written before generations (checkpoint.pt named by checkpoint.json) still loads;
    its next save moves it to a generation and deletes checkpoint.pt."""
    buffer = io.BytesIO()
    torch.save(_state(3), buffer)
    data = buffer.getvalue()
    local_store.put_bytes("runs/run-1/checkpoint.pt", data)
    run.write_json("checkpoint.json", {"key": "checkpoint.pt", "size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest(), "epoch": 3})
    _assert_state(run.load_checkpoint(), 3)

    run.save_checkpoint(_state(4), epoch=4)
    assert _blobs(local_store, run, "checkpoint") == [run.checkpoint_key()]
    assert not local_store.exists("runs/run-1/checkpoint.pt")


def test_saving_the_same_bytes_again_keeps_the_blob(store: Store):
    """Same bytes, same key: a repeated save rewrites identical bytes and deletes nothing."""
    run = RunFiles(store, "again")
    run.save_weights({"w": torch.ones(3)}, epoch=2)
    key = run.weights_key()
    run.save_weights({"w": torch.ones(3)}, epoch=2)
    assert run.weights_key() == key and _blobs(store, run, "best") == [key]
    assert torch.equal(run.load_weights()[0]["w"], torch.ones(3))


def test_cleanup_leaves_other_files_of_the_run_alone(store: Store):
    run = RunFiles(store, "others")
    run.write_json("config.json", {"arch": "resnet18"})
    store.put_bytes(run.key("checkpoint-notes.txt"), b"not a generation")
    store.put_bytes(run.key("best-of-3/report.md"), b"nor this")
    run.save_checkpoint(_state(), epoch=2)
    run.save_checkpoint(_state(3), epoch=3)
    run.save_weights({"w": torch.ones(2)})
    run.save_weights({"w": torch.zeros(2)})
    assert [info.key for info in store.list(run.key(""))] == sorted([
        run.key("best-of-3/report.md"), run.key("best.json"), run.weights_key(),
        run.key("checkpoint-notes.txt"), run.key("checkpoint.json"), run.checkpoint_key(),
        run.key("config.json")])


def test_run_ids_lists_each_run_once_in_order(store: Store):
    for run_id in ("b", "a.b", "a", "a-b"):
        RunFiles(store, run_id).write_json("config.json", {})
    RunFiles(store, "a").write_json("eval/test/metrics.json", {})
    store.put_bytes("runs/stray-file", b"not a run")
    assert run_ids(store) == ["a", "a-b", "a.b", "b"]


def test_require_names_the_store_and_accepts_any_file(store: Store):
    with pytest.raises(RunNotFound, match=f"run 'run-1' not found on {re.escape(store.uri)}"):
        RunFiles(store, "run-1").require()
    RunFiles(store, "run-1").write_json("eval/test/metrics.json", {})
    assert RunFiles(store, "run-1").require().run_id == "run-1"
    assert RunNotFound.kind == "not-found"


def test_delete_removes_pointers_first_and_config_last(tmp_path: Path):
    store = RecordingStore(tmp_path / "store")
    run = RunFiles(store, "run-1")
    run.write_json("config.json", {})
    run.save_checkpoint(_state(), epoch=2)
    run.save_weights({"w": torch.ones(2)}, epoch=2)
    run.write_history([{"epoch": 1}])
    run.write_json("result.json", {})
    run.write_json("eval/test/metrics.json", {})
    RunFiles(store, "run-10").write_json("config.json", {})
    files = run.keys()
    store.writes.clear()
    assert run.delete() == len(files) == 8
    deleted = [write.removeprefix("delete runs/run-1/") for write in store.writes]
    assert deleted[:3] == ["result.json", "checkpoint.json", "best.json"]
    assert deleted[-1] == "config.json" and sorted(deleted) == sorted(
        key.removeprefix("runs/run-1/") for key in files)
    assert run.keys() == [] and RunFiles(store, "run-10").exists()
    assert not (store.root / "runs" / "run-1").exists()  # no empty folders left behind


# --------------------------------------------------------------------------------------------
# The pointer documents (checkpoint.json, best.json)


def test_a_pointer_from_before_content_addressed_blobs_still_reads(run: RunFiles,
                                                                   local_store: LocalStore):
    data = b"weights"
    local_store.put_bytes(run.key("best.safetensors"), data)
    old = {"key": "best.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "epoch": 3}
    local_store.put_bytes(run.key("best.json"), json.dumps(old).encode())  # no size yet
    assert run.read_weights_bytes() == data
    assert run.weights_key() == run.key("best.safetensors")


@pytest.mark.parametrize(("change", "field"), [
    (lambda p: p.update(key="../../other-run/best.safetensors"), "key: String should match "
     "pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$' (got '../../other-run/best.safetensors')"),
    (lambda p: p.update(sha256=None), "sha256: Input should be a valid string (got None)"),
    (lambda p: p.update(size="7"), "size: Input should be a valid integer (got '7')"),
])
def test_an_edited_pointer_is_one_line_naming_file_and_field(run: RunFiles,
                                                             local_store: LocalStore, change,
                                                             field: str):
    run.save_weights({"w": torch.zeros(2)}, epoch=1)
    pointer = json.loads(local_store.get_bytes(run.key("best.json")))
    assert set(pointer) == {"key", "sha256", "size", "epoch"}
    change(pointer)
    local_store.put_bytes(run.key("best.json"), json.dumps(pointer).encode())
    with pytest.raises(DamagedRunFile) as caught:
        run.read_weights_bytes()
    assert str(caught.value) == f"{run.key('best.json')}: field {field}"
    assert isinstance(caught.value, RunError)


# --------------------------------------------------------------------------------------------
# config.json and result.json


@pytest.mark.parametrize("name", ["config.json", "result.json"])
def test_run_documents_as_written_before_their_models_read_back_byte_for_byte(
        run: RunFiles, local_store: LocalStore, name: str):
    local_store.put_bytes(run.key(name), fixture_bytes(name))
    document = run.record() if name == "config.json" else run.result()
    run.write(name, document)
    assert local_store.get_bytes(run.key(name)) == fixture_bytes(name)


def test_a_record_reads_as_written(run: RunFiles):
    record = RunRecord.model_validate(json.loads(fixture_bytes("config.json")))
    run.write("config.json", record)
    assert run.record() == record
    assert run.record().objective.kind == "distillation"
    assert run.record().extensions[0].epochs_before == 2


def test_a_record_from_a_writer_that_left_out_world_size_still_reads(run: RunFiles,
                                                                      local_store: LocalStore):
    record = json.loads(fixture_bytes("config.json"))
    del record["world_size"], record["objective"], record["extensions"]
    local_store.put_bytes(run.key("config.json"), json.dumps(record).encode())
    assert (run.record().world_size, run.record().objective, run.record().extensions) == (
        1, None, [])


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r["dataset"].update(manifest_sha256="zz"), "field dataset.manifest_sha256: "
     "String should match pattern '^[0-9a-f]{64}$' (got 'zz')"),
    (lambda r: r["config"].update(image_size="224"), "field config.image_size: Input should "
     "be a valid integer (got '224')"),
    (lambda r: r.pop("classes"), "field classes: Field required"),
    (lambda r: r["extensions"][0].pop("at_epoch"), "field extensions.0.at_epoch: Field "
     "required"),
])
def test_an_edited_config_json_is_one_line_naming_file_and_field(
        run: RunFiles, local_store: LocalStore, change, problem: str):
    record = json.loads(fixture_bytes("config.json"))
    change(record)
    local_store.put_bytes(run.key("config.json"), json.dumps(record).encode())
    with pytest.raises(DamagedRunFile) as caught:
        run.record()
    assert str(caught.value) == f"runs/run-1/config.json: {problem}"
    assert isinstance(caught.value, RunError)


@pytest.mark.parametrize(("change", "problem"), [
    (lambda r: r.update(best_epoch="3"), "field best_epoch: Input should be a valid integer "
     "(got '3')"),
    (lambda r: r.pop("best_valid_top1"), "field best_valid_top1: Field required"),
])
def test_an_edited_result_json_is_one_line_naming_file_and_field(
        run: RunFiles, local_store: LocalStore, change, problem: str):
    result = json.loads(fixture_bytes("result.json"))
    change(result)
    local_store.put_bytes(run.key("result.json"), json.dumps(result).encode())
    with pytest.raises(DamagedRunFile) as caught:
        run.result()
    assert str(caught.value) == f"runs/run-1/result.json: {problem}"


def test_a_run_without_a_record_says_so(run: RunFiles, local_store: LocalStore):
    assert run.optional_record() is None
    with pytest.raises(RunError) as caught:
        run.record()
    assert str(caught.value) == f"run 'run-1' has no config.json on {local_store.uri}"
    assert type(caught.value) is RunError
