"""The plumbing every JSON document flowerml stores shares: the base model, the validating
reader and the one-line error of a document that does not read.

Each document type (the manifest, CURRENT, quarantine.json, card.json, aliases and their
history, export.json, `_SUCCESS.json`, a run's JSON files) is a pydantic model declared by the
one module that writes and reads it; `flowerml.schemas` lists them and writes their JSON
Schemas to docs/schemas/. A document read back is validated whole: a damaged or hand-edited one
raises a `DocumentError` (or the owner's subclass of it) whose message is one line naming the
file and the first bad field, e.g. `.../manifest.json: field files.3.sha256: String should
match pattern '^[0-9a-f]{64}$' (got 'zz')`.

Documents accept fields they do not declare (`extra="allow"`, kept on a round trip): a newer
writer's additions do not stop an older reader, and a reader never drops what it did not know.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from flowerml.core.errors import UserError

SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
_SHOWN_INPUT = 60

Model = TypeVar("Model")


class DocumentError(UserError):
    """A stored document that does not read as its type: damaged, truncated or edited by hand.
    The message is one line naming the file and the field."""


class StoredDocument(BaseModel):
    """The base of every stored document: fields it does not declare are kept, not refused;
    declared ones are strict (a number written as a string is an edit, not a number)."""

    model_config = ConfigDict(extra="allow", strict=True)


def read_document(model: type[Model], raw: bytes | str, where: str,
                  error: type[DocumentError] = DocumentError) -> Model:
    """The document `raw` read from `where` (a store key or location) as `model`, validated;
    `error` (one line: file and field) when it is not valid JSON or not that document."""
    try:
        return TypeAdapter(model).validate_json(raw)
    except ValidationError as invalid:
        raise error(describe_invalid(where, invalid)) from None


def describe_invalid(where: str, invalid: ValidationError) -> str:
    """One line: the file, the first bad field, what is wrong with it, and how many more."""
    problems = invalid.errors(include_url=False)
    first = problems[0]
    if first["type"] == "json_invalid":
        return one_line(f"{where}: not valid JSON ({first.get('ctx', {}).get('error', '')})")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return field_message(where, first["loc"], f"{first['msg']}{shown_input(first)}{more}")


def field_message(where: str, loc: tuple[int | str, ...] | str, problem: str) -> str:
    """`<where>: field <a.0.b>: <problem>` on one line (the document itself when loc is empty)."""
    field = loc if isinstance(loc, str) else ".".join(str(part) for part in loc)
    return one_line(f"{where}: field {field or '(document)'}: {problem}")


def shown_input(problem: Any) -> str:
    value = problem.get("input")
    if isinstance(value, dict | list) or "input" not in problem or problem["type"] == "missing":
        return ""
    shown = repr(value)
    return f" (got {shown[:_SHOWN_INPUT]}{'...' if len(shown) > _SHOWN_INPUT else ''})"


def one_line(message: str) -> str:
    return " ".join(message.split())


def json_schema(model: type) -> dict[str, Any]:
    """The JSON Schema of what a document's reader accepts (field names as stored: `from`)."""
    return TypeAdapter(model).json_schema(by_alias=True, mode="validation")


def plain(document: BaseModel) -> dict[str, Any]:
    """The document as the JSON object it is stored as: aliases as field names, extras kept,
    and only the fields it was given (an optional field absent stays absent, not null)."""
    return document.model_dump(mode="json", by_alias=True, exclude_unset=True)


def check_document(model: type[Model], value: object, where: str,
                   error: type[UserError]) -> Model:
    """`value` (a JSON-able document about to be written) as `model`, validated as its reader
    will validate it (from its JSON); `error` naming the field if it would not read back."""
    try:
        return TypeAdapter(model).validate_json(json.dumps(value))
    except ValidationError as invalid:
        raise error(describe_invalid(where, invalid)) from None

