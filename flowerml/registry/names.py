"""The registry's vocabulary: model and alias names, model references (`NAME@ALIAS`,
`NAME:VERSION`), the time stamped on its records, and its errors.

Everything here is pure: `flowerml.registry.aliases` and `flowerml.registry.versions` build on it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flowerml.core.errors import UserError

MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_NAME = re.compile(MODEL_NAME)
MAX_VERSION = 999_999
DEFAULT_ALIAS = "production"


class RegistryError(UserError):
    """An unknown model, alias or version, an uncommitted or corrupt version, or a bad name."""


class RegistryNotFound(RegistryError):
    """A version or alias the registry does not have."""

    kind = "not-found"


def is_name(text: str) -> bool:
    """Whether `text` is a valid model or alias name (as `check_name` accepts)."""
    return _NAME.fullmatch(text) is not None


def check_name(name: str, what: str = "model") -> str:
    if not isinstance(name, str) or not is_name(name):
        raise RegistryError(f"{what} name must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit (got {name!r})")
    return name


def parse_model_ref(ref: str, default_alias: str = DEFAULT_ALIAS
                    ) -> tuple[str, str | None, int | None]:
    """'m' -> (m, default_alias, None); 'm@alias' -> (m, alias, None); 'm:3' or 'm:000003' -> (m, None, 3)."""
    model, at, alias = ref.partition("@")
    model, colon, number = model.partition(":")
    if at and colon:
        raise RegistryError(f"model reference {ref!r} names both an alias and a version")
    check_name(model)
    if colon:
        return model, None, _parse_version(number, ref)
    return model, check_name(alias, "alias") if at else default_alias, None


def _parse_version(text: str, ref: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_VERSION:
        raise RegistryError(f"model reference {ref!r}: version must be a number from 1 to "
                            f"{MAX_VERSION}")
    return int(text)


def now() -> str:
    """The time the registry stamps on what it writes: UTC, ISO 8601, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")
