"""Every "not found" of the commands that read a store names the store it read (as its URI,
which never carries credentials), and so does an empty listing: run against the wrong store,
`registry show` used to say only "has no versions"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.io.storage import Store
from flowerml.io.storage_s3 import S3Store
from flowerml.registry.versions import Registry
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.registries import two_version_registry
from tests.helpers.synthetic import SyntheticData

# Each command that names something, and what it says when the store has none of it.
NOT_FOUND = [
    (("registry", "show", "flowers102"), "model 'flowers102' has no versions on {uri}"),
    (("registry", "history", "flowers102"), "model 'flowers102' has no versions on {uri}"),
    (("registry", "rollback", "flowers102"), "model 'flowers102' has no versions on {uri}"),
    (("datasets", "show", "roses"), "dataset 'roses' is not on {uri}"),
    (("runs", "show", "nope"), "run 'nope' not found on {uri}"),
]
# Each listing, and the stderr line of an empty one (stdout stays empty: nothing to list).
EMPTY = [(("registry", "list"), "no models on {uri}"),
         (("datasets", "list"), "no datasets on {uri}"),
         (("runs", "list"), "no runs on {uri}")]


@pytest.fixture
def registry(synthetic_data: SyntheticData, tmp_path: Path) -> Registry:
    return two_version_registry(synthetic_data, tmp_path)


def store_option(store: Store) -> list[str]:
    return ["--store", store.uri]


def store_env(store: Store) -> dict[str, str]:
    """The settings that reach the store (moto's endpoint for an S3 one), with an access key
    that must not show up in any message."""
    env = {"AWS_ACCESS_KEY_ID": "operator-key", "AWS_SECRET_ACCESS_KEY": "operator-secret"}
    if isinstance(store, S3Store):
        env.update(FLOWERML_S3_ENDPOINT_URL=store.endpoint, FLOWERML_S3_ADDRESSING_STYLE="path")
    return env


@pytest.mark.parametrize(("args", "message"), NOT_FOUND, ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else None)
def test_a_not_found_names_the_store(store: Store, args: tuple[str, ...], message: str) -> None:
    expected = message.format(uri=store.uri)
    env = store_env(store)
    for json_flag in ((), ("--json",)):
        result = invoke(*args, *store_option(store), *json_flag, env=env)
        assert_refused(result, f"flowerml: error: {expected}")
        assert "operator-" not in result.output
        if json_flag:
            error = json.loads(result.stdout.splitlines()[-1])
            assert error["error"].startswith(expected) and error["kind"] == "not-found"


@pytest.mark.parametrize(("args", "message"), EMPTY, ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else None)
def test_an_empty_listing_names_the_store(store: Store, args: tuple[str, ...],
                                          message: str) -> None:
    listed = invoke(*args, *store_option(store), env=store_env(store))
    assert listed.exit_code == 0, listed.output
    assert (listed.stdout, listed.stderr) == ("", message.format(uri=store.uri) + "\n")
    listed = invoke(*args, *store_option(store), "--json", env=store_env(store))
    assert (listed.exit_code, json.loads(listed.stdout)) == (0, [])


def test_an_alias_never_set_names_the_store(registry: Registry) -> None:
    """`registry history NAME --alias A` of a model that has versions but not that alias."""
    result = invoke("registry", "history", "flowers102", "--alias", "staging",
                    store=registry.store)
    assert_refused(result, f"flowerml: error: flowers102 has no alias 'staging' on "
                           f"{registry.store.uri}")
