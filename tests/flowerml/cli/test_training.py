"""`flowerml train` (flowerml/cli/training.py) on an existing run id: resumed and extended with
the run's own config."""

from __future__ import annotations

import json

from tests.helpers.cli import assert_refused, invoke
from tests.helpers.stores import StoreAndCache


def test_a_larger_epochs_alone_extends_a_run_with_its_own_config(tiny_run: StoreAndCache) -> None:
    store, cache = tiny_run
    result = invoke("train", "--run-id", "tiny", "--epochs", "2", "--device", "cpu",
                    "--workers", "0", "--json", store=store, cache=cache)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs_run"] == 2 and summary["resumed_from_epoch"] == 1
    assert "flowerml: run tiny (resume it with: flowerml train --run-id tiny)" in result.stderr
    record = json.loads((store.root / "runs/tiny/config.json").read_text())
    assert record["config"]["arch"] == "resnet18" and record["config"]["epochs"] == 2


def test_a_recipe_given_again_is_compared_with_the_runs_config(tiny_run: StoreAndCache) -> None:
    store, cache = tiny_run
    result = invoke("train", "--run-id", "tiny", "--recipe", "demo", "--device", "cpu",
                    "--workers", "0", store=store, cache=cache)
    assert_refused(result, "different configuration")
