"""flowerml.serving.scoring with its plan, spool and shards: a collection listed once into shards, each
scored into a create-only part, `_SUCCESS.json` last; re-runs skip finished shards; bad input
refused before any write."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from flowerml.io.storage import S3Options, Store
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.export_record import ExportError
from flowerml.registry.names import RegistryError
from flowerml.registry.release import load_version
from flowerml.registry.versions import Registry
from flowerml.serving.export import PixelsToLogits
from flowerml.serving.inputs import InputError, list_input
from flowerml.serving.prediction import ImageError, image_pixels
from flowerml.serving.scoring import (
    SUCCESS,
    DamagedSuccessRecord,
    finish_scoring,
    read_success,
    score_collection,
)
from flowerml.serving.scoring_plan import (
    LISTING,
    ScoringError,
    ScoringPlan,
    ScoringRequest,
    plan_scoring,
)
from flowerml.serving.scoring_shards import ShardResult, score_shard
from tests.helpers.images import write_jpeg
from tests.helpers.scoring import PHOTO_KEYS
from tests.helpers.stored_documents import fixture_bytes
from tests.helpers.stores import copy_tree, replace_file, store_keys


def request(input: str | Path, output: str | Path, **options) -> ScoringRequest:
    return ScoringRequest(input=str(input), model=options.pop("model", "flowers102@production"),
                          output=str(output), **{"shard_size": 4, "batch_size": 3, **options})


def score(registry: Registry, input: str | Path, output: Store, *,
          s3: S3Options | None = None, **options) -> dict:
    return score_collection(request(input, output.uri, **options),
                            registry_store=registry.store, output_store=output, s3=s3)


def rows_of(output: Store, summary: dict) -> list[dict]:
    prefix = summary["output"].removeprefix(output.uri + "/")
    rows = []
    for part in summary["parts"]:
        rows += [json.loads(line) for line in
                 output.get_bytes(f"{prefix}/{part}").decode().splitlines()]
    return rows


def expected_rows(registry: Registry, folder: Path, keys: list[str]) -> dict[str, list[float]]:
    """Each readable key's probabilities from the eager model, computed here on its own."""
    model = PixelsToLogits(load_version(registry, 1, device="cpu").model).eval()
    expected = {}
    for key in keys:
        try:
            pixels = image_pixels(folder / key, 40)
        except ImageError:  # the unreadable ones have no probabilities
            continue
        with torch.no_grad():
            expected[key] = torch.softmax(model(torch.from_numpy(pixels[None])), 1)[0].tolist()
    return expected


# --- scoring ---------------------------------------------------------------------------------


def test_a_folder_is_scored_in_shards_then_success_names_the_run(registry: Registry,
                                                                 photos: Path,
                                                                 tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")
    summary = score(registry, photos, output, top_k=2)
    onnx = json.loads(registry.read_attachment(1, "export.json"))
    assert summary["runtime"] == "onnx" and summary["sha256"] == onnx["sha256"]
    assert (summary["model"], summary["version"]) == ("flowers102", 1)
    assert summary["weights_sha256"] == registry.get(1).weights_sha256
    assert (summary["images"], summary["scored"], summary["failed"]) == (8, 7, 1)
    assert (summary["shards"], summary["shards_skipped"]) == (2, 0)
    assert summary["parts"] == ["part-00000.jsonl", "part-00001.jsonl"]
    prefix = f"flowers102/000001/{summary['input_id']}"
    assert summary["output"] == f"{output.uri}/{prefix}"
    assert {k.rsplit("/", 1)[-1] for k in store_keys(output)} >= {
        LISTING, SUCCESS, *summary["parts"]}
    assert json.loads(output.get_bytes(f"{prefix}/{SUCCESS}")) == summary
    rows = rows_of(output, summary)
    assert [row["key"] for row in rows] == PHOTO_KEYS
    errors = {row["key"]: row["error"] for row in rows if "error" in row}
    assert errors.keys() == {"cut.jpg"}
    assert errors["cut.jpg"].startswith("unreadable image")
    assert [f["key"] for f in summary["failures"]] == ["cut.jpg"]
    expected = expected_rows(registry, photos, PHOTO_KEYS)
    for row in rows:
        if "error" in row:
            continue
        probabilities = expected[row["key"]]
        best = sorted(range(4), key=lambda i: -probabilities[i])[:2]
        assert row["labels"] == [i + 1 for i in best]
        assert row["names"] == [registry.get(1).card["classes"][i]["name"] for i in best]
        np.testing.assert_allclose(row["probabilities"], [probabilities[i] for i in best],
                                   atol=1e-4)


def test_torch_and_onnx_give_the_same_rankings(registry: Registry, photos: Path,
                                               tmp_path: Path) -> None:
    onnx = score(registry, photos, LocalStore(tmp_path / "onnx"), runtime="onnx")
    eager = score(registry, photos, LocalStore(tmp_path / "torch"), runtime="torch")
    assert eager["runtime"] == "torch" and eager["sha256"] == registry.get(1).weights_sha256
    assert eager["input_id"] == onnx["input_id"]
    onnx_rows = rows_of(LocalStore(tmp_path / "onnx"), onnx)
    torch_rows = rows_of(LocalStore(tmp_path / "torch"), eager)
    for mine, theirs in zip(onnx_rows, torch_rows, strict=True):
        assert mine.keys() == theirs.keys() and mine["key"] == theirs["key"]
        if "labels" in mine:
            assert mine["labels"][0] == theirs["labels"][0]
            np.testing.assert_allclose(mine["probabilities"], theirs["probabilities"],
                                       atol=1e-4)


def test_a_large_jpeg_is_decoded_reduced_to_the_same_pixels(tmp_path: Path) -> None:
    from PIL import Image

    data = write_jpeg(tmp_path / "big.jpg", 3000, 2000).read_bytes()
    pixels = image_pixels(io.BytesIO(data), 224)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.uint8
    # The full decode, resized to 256 on the short side and centre-cropped, is the reference.
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((384, 256),
                                                              Image.Resampling.BILINEAR)
    reference = np.asarray(full)[16:240, 80:304].transpose(2, 0, 1).astype(int)
    assert np.abs(pixels.astype(int) - reference).mean() < 3


def test_a_rerun_skips_finished_shards_and_a_finished_output_is_returned(
        registry: Registry, photos: Path, tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")
    first = score(registry, photos, output)
    prefix = first["output"].removeprefix(output.uri + "/")
    again = score(registry, photos, output)
    assert again == {**first, "already_complete": True}
    # A run killed before its last part and _SUCCESS: the next run does only what is missing.
    part = output.get_bytes(f"{prefix}/part-00001.jsonl")
    output.delete(f"{prefix}/part-00001.jsonl")
    output.delete(f"{prefix}/{SUCCESS}")
    resumed = score(registry, photos, output)
    assert resumed["shards_skipped"] == 1 and "already_complete" not in resumed
    assert output.get_bytes(f"{prefix}/part-00001.jsonl") == part
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "finished_at",
                                                          "shards_skipped")} == \
        {k: v for k, v in first.items() if k not in ("seconds", "finished_at",
                                                     "shards_skipped")}


def test_two_runs_on_one_output_leave_one_whole_copy(registry: Registry, photos: Path,
                                                     tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")
    results: list[dict] = []
    runs = [threading.Thread(target=lambda: results.append(score(registry, photos, output)))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
    assert len(results) == 2
    assert [row["key"] for row in rows_of(output, results[0])] == PHOTO_KEYS
    alone = score(registry, photos, LocalStore(tmp_path / "alone"))
    assert rows_of(output, results[0]) == rows_of(LocalStore(tmp_path / "alone"), alone)
    assert [k for k in store_keys(output) if k.endswith(SUCCESS)] == [
        f"flowers102/000001/{alone['input_id']}/{SUCCESS}"]


def test_success_is_written_only_when_every_part_is_there(registry: Registry, photos: Path,
                                                          tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")
    plan = plan_scoring(request(photos, output.uri), registry_store=registry.store,
                        output_store=output)
    done = [score_shard(plan, shard, registry_store=registry.store, output_store=output)
            for shard in (0,)]
    with pytest.raises(ScoringError, match="1 shards of .* have no part .first: 1.: run again"):
        finish_scoring(plan, done, output, 1.0, registry_store=registry.store)
    assert not output.exists(plan.key(SUCCESS))
    assert ScoringPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_the_input_id_is_a_hash_of_the_listing(registry: Registry, photos: Path,
                                               tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")

    def plan(folder: Path, **options) -> ScoringPlan:
        return plan_scoring(request(folder, output.uri, **options),
                            registry_store=registry.store, output_store=output)

    copy = copy_tree(photos, tmp_path / "copy")
    first = plan(copy)
    assert plan(copy).input_id == first.input_id
    assert plan(copy, shard_size=2).input_id != first.input_id  # shards hold other keys
    write_jpeg(copy / "z.jpg", 50, 50)
    assert plan(copy).input_id != first.input_id
    assert (plan(copy).images, plan(copy).shards) == (9, 3)


def test_an_output_inside_the_input_is_not_scored_again(registry: Registry, photos: Path,
                                                        tmp_path: Path) -> None:
    folder = copy_tree(photos, tmp_path / "photos")
    output = LocalStore(folder / "scores")
    first = score(registry, folder, output)
    again = score(registry, folder, output)
    assert again["input_id"] == first["input_id"] and again["already_complete"]
    assert first["images"] == len(PHOTO_KEYS)


# --- what INPUT may be -----------------------------------------------------------------------


def test_text_and_json_lists_name_keys_paths_and_comments(registry: Registry, photos: Path,
                                                          tmp_path: Path) -> None:
    copy = copy_tree(photos, tmp_path / "photos")
    (copy / "todo.txt").write_text(f"# today's photos\nb.jpg\n\n  sub/f.jpg  \n{copy}/a.jpg\n"
                                   "missing.jpg\n")
    (copy / "todo.json").write_text(json.dumps(["b.jpg", "sub/f.jpg", f"{copy}/a.jpg",
                                                "missing.jpg"], indent=1))
    output = LocalStore(tmp_path / "scores")
    from_text = score(registry, copy / "todo.txt", output)
    from_json = score(registry, copy / "todo.json", LocalStore(tmp_path / "json"))
    rows = rows_of(output, from_text)
    assert [row["key"] for row in rows] == ["b.jpg", "sub/f.jpg", f"{copy}/a.jpg",
                                            "missing.jpg"]
    assert rows[-1] == {"key": "missing.jpg", "error": "no such object"}
    assert rows == rows_of(LocalStore(tmp_path / "json"), from_json)
    assert from_text["root"] == str(copy)


def test_an_s3_prefix_is_scored_into_an_s3_output(registry: Registry, photos: Path,
                                                  s3_bucket: str, moto_endpoint: str) -> None:
    options = S3Options(endpoint_url=moto_endpoint)
    inbox = S3Store(s3_bucket, "inbox", options)
    for key in PHOTO_KEYS:
        inbox.put_bytes(key, (photos / key).read_bytes())
    output = S3Store(s3_bucket, "scores", options)
    summary = score(registry, f"s3://{s3_bucket}/inbox", output, s3=options)
    assert summary["root"] == f"s3://{s3_bucket}/inbox"
    assert list(list_input(f"s3://{s3_bucket}/inbox/**/*.jp*g", options).stream()) == [
        k for k in PHOTO_KEYS if ".jp" in k]
    assert summary["output"].startswith(f"s3://{s3_bucket}/scores/flowers102/000001/")
    rows = rows_of(output, summary)
    local = score(registry, photos, LocalStore(photos.parent / f"{photos.name}-local-scores"))
    assert rows == rows_of(LocalStore(photos.parent / f"{photos.name}-local-scores"), local)
    # A list object on S3 names keys beside it, and s3:// URIs anywhere.
    inbox.put_bytes("lists/today.txt", f"../a.jpg\ns3://{s3_bucket}/inbox/b.jpg\n".encode())
    listed = score(registry, f"s3://{s3_bucket}/inbox/lists/today.txt", output, s3=options)
    assert [(r["key"], "error" in r) for r in rows_of(output, listed)] == [
        ("../a.jpg", True), (f"s3://{s3_bucket}/inbox/b.jpg", False)]


# --- hostile entries: each is its own row, and the run goes on ------------------------------


@pytest.mark.timeout(120)  # a FIFO read would block, /dev/zero would fill memory: fail instead
def test_a_fifo_a_device_or_an_unreadable_entry_is_its_own_row(registry: Registry, photos: Path,
                                                                tmp_path: Path) -> None:
    copy = copy_tree(photos, tmp_path / "photos")
    os.mkfifo(copy / "pipe.jpg")
    (copy / "zero.jpg").symlink_to("/dev/zero")
    entries = ["a.jpg", "pipe.jpg", "zero.jpg", "/dev/zero", "/proc/self/mem", "notes.txt",
               f"{copy}/pipe.jpg", "s3://Bad_Bucket/x.jpg", "b.jpg"]
    (copy / "todo.txt").write_text("".join(f"{entry}\n" for entry in entries))
    output = LocalStore(tmp_path / "scores")
    summary = score(registry, copy / "todo.txt", output)
    rows = {row["key"]: row.get("error") for row in rows_of(output, summary)}
    fifo, device = "is a FIFO (named pipe), not a regular file", \
        "is a character device, not a regular file"
    assert list(rows) == entries
    assert rows == {
        "a.jpg": None, "pipe.jpg": fifo, "zero.jpg": device, "/dev/zero": device,
        "/proc/self/mem": "cannot read: Input/output error",
        "notes.txt": rows["notes.txt"], f"{copy}/pipe.jpg": fifo,
        "s3://Bad_Bucket/x.jpg": rows["s3://Bad_Bucket/x.jpg"], "b.jpg": None}
    assert rows["notes.txt"].startswith("not an image file")  # named in a list: a row
    assert rows["s3://Bad_Bucket/x.jpg"].startswith("invalid bucket name 'Bad_Bucket'")
    assert (summary["images"], summary["scored"], summary["failed"]) == (9, 2, 7)


def test_an_s3_key_without_credentials_is_its_own_row(registry: Registry, photos: Path,
                                                      tmp_path: Path, s3_bucket: str,
                                                      moto_endpoint: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    options = S3Options(endpoint_url=moto_endpoint)
    S3Store(s3_bucket, "inbox", options).put_bytes("b.jpg", (photos / "b.jpg").read_bytes())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    copy = copy_tree(photos, tmp_path / "photos")
    (copy / "todo.txt").write_text(f"a.jpg\ns3://{s3_bucket}/inbox/b.jpg\n")
    output = LocalStore(tmp_path / "scores")
    summary = score(registry, copy / "todo.txt", output, s3=options)
    rows = rows_of(output, summary)
    assert [row["key"] for row in rows] == ["a.jpg", f"s3://{s3_bucket}/inbox/b.jpg"]
    assert "labels" in rows[0]
    assert rows[1]["error"] == (f"no usable AWS credentials for bucket '{s3_bucket}' at "
                                f"{moto_endpoint} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                "or AWS_PROFILE)")
    assert (summary["scored"], summary["failed"]) == (1, 1)


def test_a_list_that_is_not_a_regular_utf8_file_is_refused_before_any_write(
        registry: Registry, photos: Path, tmp_path: Path) -> None:
    copy = copy_tree(photos, tmp_path / "photos")
    os.mkfifo(copy / "pipe.txt")
    (copy / "zero.txt").symlink_to("/dev/zero")
    (copy / "latin1.txt").write_bytes(b"a.jpg\nf\xe9e.jpg\n")
    (copy / "latin1.json").write_bytes(b'["a.jpg", "f\xe9e.jpg"]')
    for name, why in (("pipe.txt", "is a FIFO (named pipe), not a regular file"),
                      ("zero.txt", "is a character device, not a regular file"),
                      ("latin1.txt", "line 2 is not UTF-8 text; save the list as UTF-8"),
                      ("latin1.json", "not UTF-8 text; save the list as UTF-8"),
                      ("missing.txt", "no such list file")):
        with pytest.raises(InputError) as refused:
            score(registry, copy / name, LocalStore(tmp_path / "scores"))
        assert str(refused.value) == f"INPUT {copy / name}: {why}"
        assert nothing_written(tmp_path / "scores")


# --- bad input: refused before anything is written -------------------------------------------


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


@pytest.mark.parametrize("case", ["empty folder", "no images", "missing", "empty glob"])
def test_an_input_without_images_is_refused(registry: Registry, tmp_path: Path,
                                            case: str) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    if case == "no images":
        (folder / "notes.txt").write_text("x")
    input = {"missing": tmp_path / "nowhere", "empty glob": f"{folder}/*.jpg"}.get(case, folder)
    error, message = (InputError, "no such file or folder") if case == "missing" else \
        (ScoringError, "no images there")
    with pytest.raises(error, match=message):
        score(registry, input, LocalStore(tmp_path / "scores"))
    assert nothing_written(tmp_path / "scores")


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"shard_size": 0}, ScoringError, "--shard-size must be a whole number of at least 1"),
    ({"batch_size": -1}, ScoringError, "--batch-size must be"),
    ({"runtime": "tensorrt"}, ScoringError, "--runtime must be one of auto, onnx, onnx-int8, torch"),
    ({"model": "flowers102@staging"}, RegistryError, "flowers102 has no alias 'staging'"),
    ({"model": "roses"}, RegistryError, "roses has no alias 'production'"),
])
def test_bad_options_are_refused(registry: Registry, photos: Path, tmp_path: Path,
                                 options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        score(registry, photos, LocalStore(tmp_path / "scores"), **options)
    assert nothing_written(tmp_path / "scores")


def test_an_output_that_cannot_be_written_is_refused(registry: Registry, photos: Path,
                                                     tmp_path: Path, moto_endpoint: str) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ScoringError, match="--output .*file/scores is not writable: cannot "
                                           "create store directory"):
        score(registry, photos, LocalStore(tmp_path / "file" / "scores"))
    assert (tmp_path / "file").read_text() == "a file, not a folder"
    options = S3Options(endpoint_url=moto_endpoint)
    with pytest.raises(ScoringError, match="--output s3://no-such-bucket-here/scores: bucket "
                                           "'no-such-bucket-here' .* does not exist"):
        score(registry, photos, S3Store("no-such-bucket-here", "scores", options), s3=options)


def test_a_tampered_onnx_file_is_refused_before_scoring(registry: Registry, photos: Path,
                                                        tmp_path: Path) -> None:
    path = registry.store.root / registry.attachment_key(1, "model.onnx")
    replace_file(path, path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ExportError, match="model.onnx fails its checksum"):
        score(registry, photos, LocalStore(tmp_path / "scores"))
    assert nothing_written(tmp_path / "scores")


def test_onnx_needs_a_passing_export(registry: Registry, photos: Path, tmp_path: Path) -> None:
    record_path = registry.store.root / registry.attachment_key(1, "export.json")
    record = json.loads(record_path.read_text())
    record["parity"]["passed"] = False
    replace_file(record_path, json.dumps(record).encode())
    with pytest.raises(ScoringError, match="export failed its parity check.*--runtime torch"):
        score(registry, photos, LocalStore(tmp_path / "scores"), runtime="onnx")
    assert score(registry, photos, LocalStore(tmp_path / "auto"))["runtime"] == "torch"
    for name in ("export.json", "model.onnx"):
        (registry.store.root / registry.attachment_key(1, name)).unlink()
    with pytest.raises(ScoringError, match="has no ONNX export .run: flowerml export"):
        score(registry, photos, LocalStore(tmp_path / "scores"), runtime="onnx")
    assert nothing_written(tmp_path / "scores")


def test_an_output_started_with_other_settings_is_refused(registry: Registry, photos: Path,
                                                          tmp_path: Path) -> None:
    output = LocalStore(tmp_path / "scores")
    started = score(registry, photos, output, runtime="torch")
    before = store_keys(output)
    with pytest.raises(ScoringError, match="was started with --runtime torch"):
        score(registry, photos, output, runtime="onnx")
    with pytest.raises(ScoringError, match="was started with --top-k 5"):
        score(registry, photos, output, top_k=3)
    assert store_keys(output) == before
    assert score(registry, photos, output)["runtime"] == started["runtime"]  # auto follows


def test_a_run_racing_another_with_other_settings_is_refused(
        registry: Registry, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs read no _listing.json; the first writes its record; the second, with another
    runtime, finds it there when it tries to write its own, and stops before any part."""
    import flowerml.serving.scoring_plan as scoring_plan

    output = LocalStore(tmp_path / "scores")
    score(registry, photos, output, runtime="torch")
    real, calls = scoring_plan.read_listing, []

    def not_yet_on_the_first_read(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(scoring_plan, "read_listing", not_yet_on_the_first_read)
    before = store_keys(output)
    with pytest.raises(ScoringError, match="was just started by another run with --runtime "
                                           "torch --top-k 5"):
        score(registry, photos, output, runtime="onnx")
    assert store_keys(output) == before and len(calls) == 2


# --------------------------------------------------------------------------------------------
# The _SUCCESS.json document


def fixture_plan(output: LocalStore) -> ScoringPlan:
    """The plan of the fixture _SUCCESS.json (written before its model)."""
    success = json.loads(fixture_bytes(SUCCESS))
    fields = {name: success[name] for name in ("input", "root", "input_id", "shards",
                                               "shard_size", "model", "version", "runtime",
                                               "sha256", "weights_sha256", "top_k",
                                               "batch_size")}
    return ScoringPlan(**fields, format=1, images=success["images"], registry="registry",
                       output=output.uri, prefix=f"tulips/000001/{success['input_id']}")


def test_success_json_written_before_its_model_reads_and_round_trips(local_store: LocalStore
                                                                     ) -> None:
    plan = fixture_plan(local_store)
    local_store.put_bytes(plan.key(SUCCESS), fixture_bytes(SUCCESS))
    success = read_success(local_store, plan)
    assert success == json.loads(fixture_bytes(SUCCESS))
    assert json.dumps(success, indent=2).encode() == fixture_bytes(SUCCESS)


def test_finish_writes_what_read_success_reads(local_store: LocalStore) -> None:
    plan = fixture_plan(local_store)
    for shard in range(plan.shards):
        local_store.put_bytes(plan.part_key(shard), b"")
    written = finish_scoring(plan, [ShardResult(0, 2, 0), ShardResult(1, 1, 0)], local_store,
                             0.5, registry_store=local_store)
    assert read_success(local_store, plan) == written
    assert (written["images"], written["scored"], written["parts"]) == (
        3, 3, ["part-00000.jsonl", "part-00001.jsonl"])


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s.update(scored="2"), "scored: Input should be a valid integer (got '2')"),
    (lambda s: s["failures"][0].update(error=None),
     "failures.0.error: Input should be a valid string (got None)"),
    (lambda s: s.pop("finished_at"), "finished_at: Field required"),
])
def test_an_edited_success_json_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                                  change, field: str) -> None:
    plan = fixture_plan(local_store)
    success = json.loads(fixture_bytes(SUCCESS))
    change(success)
    local_store.put_bytes(plan.key(SUCCESS), json.dumps(success).encode())
    with pytest.raises(DamagedSuccessRecord) as caught:
        read_success(local_store, plan)
    assert str(caught.value) == f"{local_store.location(plan.key(SUCCESS))}: field {field}"
    assert isinstance(caught.value, ScoringError)
