"""flowerml.distillation.agreement's stored document: `eval/<split>/agreement.json` is an
`Agreement`, written through its model and read validated (measuring one is covered by
test_distill, which trains a student)."""

from __future__ import annotations

import json

import pytest

from flowerml.distillation.agreement import AGREEMENT_FILE, Agreement
from flowerml.io.storage_local import LocalStore
from flowerml.training.runs import DamagedRunFile, RunFiles
from tests.helpers.stored_documents import fixture_bytes

NAME = f"eval/test/{AGREEMENT_FILE}"


def test_agreement_json_as_written_before_its_model_reads_back_byte_for_byte(
        local_store: LocalStore) -> None:
    run = RunFiles(local_store, "student")
    local_store.put_bytes(run.key(NAME), fixture_bytes("agreement.json"))
    agreement = run.read(NAME, Agreement)
    assert (agreement.n, agreement.teacher["label"]) == (6149, "flowers102:000002")
    run.write(NAME, agreement)
    assert local_store.get_bytes(run.key(NAME)) == fixture_bytes("agreement.json")
    assert agreement.to_json() == json.loads(fixture_bytes("agreement.json"))


@pytest.mark.parametrize(("change", "problem"), [
    (lambda a: a.update(n=6149.5), "field n: Input should be a valid integer (got 6149.5)"),
    (lambda a: a.pop("teacher_top1"), "field teacher_top1: Field required"),
])
def test_an_edited_agreement_json_is_one_line_naming_file_and_field(local_store: LocalStore,
                                                                    change, problem: str) -> None:
    run = RunFiles(local_store, "student")
    agreement = json.loads(fixture_bytes("agreement.json"))
    change(agreement)
    local_store.put_bytes(run.key(NAME), json.dumps(agreement).encode())
    with pytest.raises(DamagedRunFile) as caught:
        run.read(NAME, Agreement)
    assert str(caught.value) == f"runs/student/{NAME}: {problem}"
