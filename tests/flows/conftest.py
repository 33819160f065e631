"""Fixtures the flow tests share with the library tests: `registered_run`, the session's tiny
ResNet-18 registered as flowers102:1 and made production (read-only: copy it to change it)."""

from tests.flowerml.conftest import registered_run  # noqa: F401  (a session fixture)
