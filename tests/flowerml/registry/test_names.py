"""flowerml.registry.names: model references and what they name."""

from __future__ import annotations

import pytest

from flowerml.registry.names import RegistryError, parse_model_ref


def test_parse_model_ref() -> None:
    assert parse_model_ref("flowers102") == ("flowers102", "production", None)
    assert parse_model_ref("flowers102", default_alias="staging") == ("flowers102", "staging",
                                                                      None)
    assert parse_model_ref("flowers102@canary") == ("flowers102", "canary", None)
    assert parse_model_ref("flowers102:3") == ("flowers102", None, 3)
    assert parse_model_ref("flowers102:000003") == ("flowers102", None, 3)
    for bad in ("flowers102:", "flowers102:x", "flowers102:0", "flowers102@", "@prod",
                "flowers102@a:3", "Flowers"):
        with pytest.raises(RegistryError):
            parse_model_ref(bad)
