"""The library's `flowerml` command run in-process, and the one check of a refusal."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from flowerml.cli import cli
from flowerml.io.storage_local import LocalStore


def invoke(*args: str, env: dict[str, str] | None = None, store: LocalStore | None = None,
           cache: Path | None = None) -> Result:
    """`flowerml ARGS` (flowerml.cli.cli); `store` and `cache` become FLOWERML_STORE and
    FLOWERML_CACHE_DIR, on top of `env`."""
    env = dict(env or {})
    if store is not None:
        env["FLOWERML_STORE"] = str(store.root)
    if cache is not None:
        env["FLOWERML_CACHE_DIR"] = str(cache)
    return CliRunner().invoke(cli, list(args), env=env)


def assert_refused(result: Result, message: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr, naming it; no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
