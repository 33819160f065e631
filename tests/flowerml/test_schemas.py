"""flowerml.schemas: the committed docs/schemas/ are what the document models generate."""

from __future__ import annotations

import json
from pathlib import Path

from flowerml import schemas

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_committed_schemas_are_current() -> None:
    generated = schemas.schema_texts()
    committed = {path.name: path.read_text() for path in COMMITTED.glob("*.json")}
    assert sorted(committed) == sorted(generated), "run python -m flowerml.schemas --write " \
                                                   "docs/schemas"
    for name, text in generated.items():
        assert committed[name] == text, f"docs/schemas/{name} is out of date: run python -m " \
                                        "flowerml.schemas --write docs/schemas"


def test_check_names_a_stale_schema(tmp_path: Path, capsys) -> None:
    assert schemas.main(["--write", str(tmp_path)]) == 0
    assert schemas.main(["--check", str(tmp_path)]) == 0
    edited = json.loads((tmp_path / "manifest.json").read_text())
    edited["required"].remove("files")
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert schemas.main(["--check", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"{tmp_path}/manifest.json: out of date (run python -m "
                                       f"flowerml.schemas --write {tmp_path})\n")
