"""`python -m flows.<flow> '<params JSON>'`: one flow run from a shell, its summary printed as
JSON; exit 2 for bad parameters or input (one line), 1 when the gate refused, 0 when promoted
or up to date."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flowerml.core.errors import FlowermlError

Params = TypeVar("Params", bound=BaseModel)


def run_once(flow: Callable[[Params], dict[str, Any]], params: type[Params], argv: list[str],
             *, name: str) -> int:
    """Validate `argv[0]` (JSON, empty: every default) as `params`, run `flow` on it."""
    try:
        summary = flow(params.model_validate_json(argv[0] if argv else "{}"))
    except ValidationError as error:
        print(f"flowerml: error: {describe_parameter_error(error, name)}", file=sys.stderr)
        return 2
    except FlowermlError as error:
        print(f"flowerml: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    # as `flowerml retrain`: 1 when the gate refused
    return 0 if summary["promoted"] or summary.get("up_to_date") else 1


def describe_parameter_error(error: ValidationError, name: str) -> str:
    """The first bad parameter in one line: `retrain parameter gate.threshold: ...`."""
    first = error.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{name} parameter {field}: {message}" if field else f"{name} parameters: {message}"
