"""The JSON Schemas of every document flowerml stores, generated from their pydantic models.

`python -m flowerml.schemas --write docs/schemas` writes docs/schemas/<document>.json;
`python -m flowerml.schemas --check docs/schemas` exits 1 naming each schema that is missing or
differs from its model (tests/flowerml/test_schemas.py checks the committed ones are current).
Each model lives in the module that writes and reads its document; this module only lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowerml.core.documents import json_schema
from flowerml.data.manifest import CurrentPointer, Manifest, Quarantine
from flowerml.data.raw_mirror import SourcesRecord
from flowerml.distillation.agreement import Agreement
from flowerml.evaluation.predictions import EvaluationMetrics
from flowerml.registry.aliases import AliasRecord, HistoryEntry
from flowerml.registry.export_record import ExportRecord, Int8Record
from flowerml.registry.model_card import ModelCard
from flowerml.registry.versions import Claim, Committed
from flowerml.serving.scoring import ScoringSuccess
from flowerml.serving.scoring_plan import ScoringListing, ScoringShard
from flowerml.training.runs import BlobPointer, RunRecord, RunResult

DOCUMENTS: dict[str, type] = {
    "sources": SourcesRecord,
    "manifest": Manifest,
    "current": CurrentPointer,
    "quarantine": Quarantine,
    "run-config": RunRecord,
    "run-result": RunResult,
    "run-blob-pointer": BlobPointer,
    "evaluation-metrics": EvaluationMetrics,
    "agreement": Agreement,
    "card": ModelCard,
    "claim": Claim,
    "committed": Committed,
    "alias": AliasRecord,
    "alias-history-entry": HistoryEntry,
    "export": ExportRecord,
    "export-int8": Int8Record,
    "scoring-listing": ScoringListing,
    "scoring-shard": ScoringShard,
    "scoring-success": ScoringSuccess,
}
"""Document name (its schema's file name, without .json) -> its model."""


def schema_texts() -> dict[str, str]:
    """{file name: schema text} for every stored document, as `--write` writes them."""
    return {f"{name}.json": json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n"
            for name, model in DOCUMENTS.items()}


def stale_schemas(folder: Path) -> list[str]:
    """The schema files under `folder` that are missing or differ from their model."""
    return [name for name, text in schema_texts().items()
            if not (folder / name).is_file() or (folder / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowerml.schemas", description=__doc__
                                     .splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="FOLDER", help="write every schema")
    action.add_argument("--check", type=Path, metavar="FOLDER",
                        help="exit 1 when a schema is missing or out of date")
    args = parser.parse_args(argv)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in schema_texts().items():
            (args.write / name).write_text(text)
        print(f"wrote {len(DOCUMENTS)} schemas to {args.write}")
        return 0
    stale = stale_schemas(args.check)
    for name in stale:
        print(f"{args.check / name}: out of date (run python -m flowerml.schemas --write "
              f"{args.check})", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
