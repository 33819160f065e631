"""`flowerml distill` as a user types it: a student run with its teacher and agreement, its
evaluation, its resume and release; and every bad input in one line, exit 2, nothing written.

The teacher is the session's registered tiny ResNet-18 (flowers102:1, production), on the
module's own copy of its store; a 3-class dataset `other` sits beside it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from flowerml.data.ingest import ingest
from flowerml.data.source_files import FetchOptions
from flowerml.data.synthetic import SyntheticSpec, write_synthetic_archive
from flowerml.distillation import distill as distillation
from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.stores import StoreAndCache, copy_tree
from tests.helpers.synthetic import RegisteredRun

TEACHER = "flowers102@production"
STUDENT = ["--student", "mobilenet_v3_small", "--weights", "none", "--epochs", "1",
           "--batch-size", "4", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def teacher_store(registered_run: RegisteredRun,
                  tmp_path_factory: pytest.TempPathFactory) -> StoreAndCache:
    """A copy of the teacher's store, plus dataset `other` (3 classes, not the teacher's 4)."""
    root = tmp_path_factory.mktemp("distill-cli")
    copy_tree(registered_run.store.root, root / "store")
    copy_tree(registered_run.cache, root / "cache")
    store = LocalStore(root / "store", concurrency=8)
    write_synthetic_archive(root / "other", SyntheticSpec(classes=3, per_class=4, image_size=40,
                                                          seed=9))
    ingest(str(root / "other"), store, "other", root / "cache", FetchOptions())
    return StoreAndCache(store, root / "cache")


def snapshot(store: LocalStore) -> dict[str, tuple[int, int]]:
    """Every file of the store with its size and modification time."""
    return {str(path.relative_to(store.root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in store.root.rglob("*") if path.is_file() and path.suffix != ".lock"}


@pytest.mark.slow  # trains a student, evaluates, resumes and releases it (~10 s)
def test_a_student_run_its_evaluation_resume_and_release(teacher_store: StoreAndCache,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, cache = teacher_store
    # Each release times the student and its teacher on the CPU: 0.05 s each, not 1 s, is
    # enough for a figure (the card's figures are checked in test_distill.py's release test).
    monkeypatch.setattr(distillation, "release_student",
                        functools.partial(distillation.release_student, speed_seconds=0.05))
    trained = invoke("distill", "--teacher", TEACHER, *STUDENT, "--temperature", "2",
                     "--alpha", "0.5", "--run-id", "cli-student", "--json",
                     store=store, cache=cache)
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert set(summary) == {"run_id", "checkpoint", "best_valid_top1", "best_epoch",
                            "epochs_run", "resumed_from_epoch", "seconds", "images_per_second",
                            "stopped_early", "world_size", "teacher", "agreement_valid"}
    teacher = Registry(store, "flowers102").get(1)
    assert summary["teacher"] == {"source": "registry", "name": "flowers102", "version": 1,
                                  "sha256": teacher.weights_sha256,
                                  "label": "flowers102:000001"}
    assert 0 <= summary["agreement_valid"] <= 1
    assert "resume it with: flowerml distill --run-id cli-student" in trained.stderr
    record = json.loads((store.root / "runs/cli-student/config.json").read_text())
    # The image size follows the teacher's (40 px) when not given.
    assert record["config"]["image_size"] == teacher.card["image_size"] == 40
    assert record["objective"]["temperature"] == 2.0 and record["objective"]["alpha"] == 0.5

    evaluated = invoke("evaluate", "--run", "cli-student", "--device", "cpu", "--workers", "0",
                       "--json", store=store, cache=cache)
    assert evaluated.exit_code == 0, evaluated.output
    evaluation = json.loads(evaluated.stdout)
    assert 0 <= evaluation["agreement"] <= 1
    assert evaluation["teacher_top1"] == pytest.approx(teacher.card["metrics"]["top1"])
    saved = json.loads((store.root / "runs/cli-student/eval/test/agreement.json").read_text())
    assert saved["agreement"] == evaluation["agreement"] and saved["n"] == evaluation["n"]
    plain = invoke("evaluate", "--run", "tiny", "--device", "cpu", "--workers", "0", "--json",
                   store=store, cache=cache)
    assert "agreement" not in json.loads(plain.stdout)  # a run without a teacher

    # --run-id alone resumes with the run's own teacher and settings, then releases it.
    released = invoke("distill", "--run-id", "cli-student", "--device", "cpu", "--workers",
                      "0", "--promote", "--threshold", "0", "--max-gap", "1", "--json",
                      store=store, cache=cache)
    assert released.exit_code == 0, released.output
    release = json.loads(released.stdout)
    assert release["resumed_from_epoch"] == 1
    assert release["release"]["label"] == "flowers102-small:000001"
    assert release["release"]["promoted"] is True
    assert Registry(store, "flowers102-small").alias("production").version == 1

    refused = invoke("distill", "--run-id", "cli-student", "--device", "cpu", "--workers", "0",
                     "--promote", "--model", "strict-small", "--threshold", "1",
                     store=store, cache=cache)
    assert refused.exit_code == 1, refused.output  # registered, but the gate refused it
    assert "does not clear the student gate" in refused.stdout
    assert "< threshold 1.0000" in refused.stdout
    assert Registry(store, "strict-small").versions()[0].committed
    assert Registry(store, "strict-small").alias("production") is None

    # `registry promote` judges a student by its own gate, from the figures on its card.
    still = invoke("registry", "promote", "strict-small", "1", "--threshold", "1",
                   store=store, cache=cache)
    assert still.exit_code == 1, still.output
    assert "< threshold 1.0000" in still.output and "max gap 0.0100" in still.output
    champion_options = invoke("registry", "promote", "strict-small", "1", "--tolerance", "0.5",
                              store=store, cache=cache)
    assert champion_options.exit_code == 2
    assert champion_options.stderr.strip() == (
        "flowerml: error: strict-small:000001 is a student: its gate is --threshold and "
        "--max-gap, not --tolerance")
    not_a_student = invoke("registry", "promote", "flowers102", "1", "--max-gap", "0.5",
                           store=store, cache=cache)
    assert not_a_student.exit_code == 2
    assert "--max-gap is for student versions; flowers102:000001 is not one" \
        in not_a_student.stderr
    assert Registry(store, "strict-small").alias("production") is None
    moved = invoke("registry", "promote", "strict-small", "1", "--threshold", "0",
                   "--max-gap", "1", "--json", store=store, cache=cache)
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["promoted"] is True
    assert Registry(store, "strict-small").alias("production").version == 1
    move = Registry(store, "strict-small").history("production")[-1]
    assert move["reason"].startswith("student gate: test top-1")
    assert not move.get("forced")


BAD_INPUT = [
    (["--teacher", "flowers102@nope", *STUDENT],
     "--teacher flowers102@nope: flowers102 has no alias 'nope'"),
    (["--teacher", "tulips:1", *STUDENT], "--teacher tulips:1: tulips has no version 000001"),
    (["--teacher-run", "missing", *STUDENT], "--teacher-run missing: no such run"),
    (["--teacher", TEACHER, *STUDENT, "--dataset", "other"],
     "teacher flowers102:000001 was trained on 4 classes that differ from other@"),
    (["--teacher", TEACHER, *STUDENT[2:], "--student", "resnet9"],
     "--student must be one of resnet18, resnet34, resnet50, mobilenet_v3_large, "
     "mobilenet_v3_small, efficientnet_b0: got 'resnet9'"),
    (["--teacher", TEACHER, *STUDENT, "--temperature", "0"],
     "--temperature must be greater than 0 and at most 100 (got 0.0)"),
    (["--teacher", TEACHER, *STUDENT, "--temperature", "-2"],
     "--temperature must be greater than 0 and at most 100 (got -2.0)"),
    (["--teacher", TEACHER, *STUDENT, "--alpha", "1.5"],
     "--alpha must be between 0 and 1 (got 1.5)"),
    (["--teacher", TEACHER, *STUDENT, "--alpha", "-0.1"],
     "--alpha must be between 0 and 1 (got -0.1)"),
    (["--teacher", TEACHER, *STUDENT, "--mixup", "2"], "--mixup must be between 0 and 1"),
    (["--teacher", TEACHER, "--teacher-run", "tiny", *STUDENT],
     "give --teacher or --teacher-run, not both"),
    ([*STUDENT], "give the teacher: --teacher NAME@ALIAS|NAME:VERSION or --teacher-run ID"),
    (["--teacher", TEACHER, *STUDENT[2:]], "--student is required: one of resnet18"),
    (["--teacher", TEACHER, *STUDENT, "--strategy", "linear-probe"],
     "--strategy linear-probe trains on cached features"),
    (["--teacher", TEACHER, *STUDENT, "--threshold", "2"],
     "--threshold must be between 0 and 1 (got 2.0)"),
    (["--teacher", TEACHER, *STUDENT, "--model", "Bad Name"], "model name must be"),
    (["--teacher", TEACHER, *STUDENT, "--epochs", "0"], "--epochs must be between 1 and 1000"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT,
                         ids=[" ".join(args[:2] + args[-2:]) for args, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(teacher_store: StoreAndCache,
                                                         args: list[str], message: str) -> None:
    store, cache = teacher_store
    before = snapshot(store)
    result = invoke("distill", *args, "--run-id", "bad", store=store, cache=cache)
    assert_refused(result, message)
    assert snapshot(store) == before


@pytest.mark.parametrize(("args", "kind"), [
    (["--teacher", "flowers102@nope", *STUDENT], "not-found"),
    (["--teacher", TEACHER, *STUDENT, "--alpha", "2"], "bad-input"),
])
def test_bad_input_with_json_ends_stdout_with_the_error(teacher_store: StoreAndCache,
                                                        args: list[str], kind: str) -> None:
    store, cache = teacher_store
    result = invoke("distill", *args, "--run-id", "bad", "--json", store=store, cache=cache)
    assert result.exit_code == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["kind"] == kind
    assert not (Path(store.root) / "runs" / "bad").exists()
