"""`flowerml registry register --run ID`: a run trained with `flowerml train` becomes a registry
version with the card and lineage the retrain flow gives its runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerml.io.storage_local import LocalStore
from flowerml.registry.release import build_card
from flowerml.registry.versions import Registry
from flowerml.training.runs import RunFiles
from tests.helpers.cli import assert_refused, invoke
from tests.helpers.stores import StoreAndCache, copy_tree
from tests.helpers.synthetic import DATASET, TINY_RUN


@pytest.fixture
def trained(tiny_run: StoreAndCache, tmp_path: Path) -> StoreAndCache:
    """A private copy of the store with the tiny run trained and not evaluated, and its cache."""
    copy_tree(tiny_run.store.root, tmp_path / "store")
    return StoreAndCache(LocalStore(tmp_path / "store"), tiny_run.cache)


def run_cli(where: StoreAndCache, *args: str):
    return invoke(*args, "--store", str(where.store.root), cache=where.cache)


def evaluate(where: StoreAndCache) -> dict:
    result = run_cli(where, "evaluate", "--run", TINY_RUN, "--device", "cpu", "--workers", "0",
                     "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def evaluated_once(tiny_run: StoreAndCache,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny run evaluated by `flowerml evaluate` once for the module, on a copy of its
    store: that store's folder and what the command printed."""
    root = tmp_path_factory.mktemp("evaluated")
    copy_tree(tiny_run.store.root, root / "store")
    return root / "store", evaluate(StoreAndCache(LocalStore(root / "store"), tiny_run.cache))


@pytest.fixture
def evaluated(evaluated_once: tuple[Path, dict], tiny_run: StoreAndCache,
              tmp_path: Path) -> tuple[StoreAndCache, dict]:
    """A private copy of the store with the tiny run trained and evaluated (`flowerml evaluate`
    --json's summary beside it)."""
    copy_tree(evaluated_once[0], tmp_path / "store")
    return StoreAndCache(LocalStore(tmp_path / "store"), tiny_run.cache), evaluated_once[1]


def test_a_run_without_a_test_evaluation_is_refused(trained: StoreAndCache) -> None:
    result = run_cli(trained, "registry", "register", "--run", TINY_RUN)
    assert_refused(result, "run 'tiny' has no test evaluation: run flowerml evaluate --run "
                           "tiny first")
    assert list(trained.store.list("registry/")) == []


def test_an_unknown_run(trained: StoreAndCache) -> None:
    assert_refused(run_cli(trained, "registry", "register", "--run", "nope"),
                   f"run 'nope' not found on {trained.store.uri}")
    result = run_cli(trained, "registry", "register", "--run", "nope", "--json")
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "not-found"


def test_register_an_evaluated_run_with_the_flows_card(
        evaluated: tuple[StoreAndCache, dict]) -> None:
    trained, summary = evaluated
    store, _ = trained
    result = run_cli(trained, "registry", "register", "--run", TINY_RUN, "--threshold", "0.0",
                     "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    registered = json.loads(result.stdout)
    metrics = {k: summary[k] for k in ("top1", "top5", "mean_class_accuracy", "loss", "n")}
    assert registered["version"] == 1 and registered["metrics"] == metrics
    assert registered["location"] == f"{store.uri}/registry/flowers102/versions/000001/"
    assert registered["gate"]["promote"] is True

    version = Registry(store, "flowers102").get(1)
    assert version.committed
    assert version.weights_sha256 == RunFiles(store, TINY_RUN).read_json("best.json")["sha256"]
    # The very card the flow's register task builds from the same run, metrics and verdict.
    expected = build_card(store, TINY_RUN, metrics, promote=True,
                          reasons=registered["gate"]["reasons"],
                          gate={"threshold": 0.0, "tolerance": 0.005, "class_drop": 0.1,
                                "force": False, "paired": None})
    card = {k: v for k, v in version.card.items()
            if k not in ("version", "model", "weights_sha256", "registered_at")}
    assert {k: v for k, v in card.items() if k != "software"} == {
        k: v for k, v in expected.items() if k != "software"}
    assert card["lineage"]["run_id"] == TINY_RUN
    assert card["lineage"]["dataset_version"] == summary["dataset_version"]
    for name in ("card.md", "report.md", "metrics.json", "confusion.png"):
        assert store.exists(f"registry/flowers102/versions/000001/{name}"), name

    # The same weights again would be a second, identical version.
    assert_refused(run_cli(trained, "registry", "register", "--run", TINY_RUN),
                   "run 'tiny' is already registered as flowers102:000001")
    assert [v.version for v in Registry(store, "flowers102").versions()] == [1]
    # And the run now names its registry version.
    shown = json.loads(run_cli(trained, "runs", "show", TINY_RUN, "--json").stdout)
    assert shown["registered"] == ["flowers102:000001"]


def test_human_output_names_the_location_the_verdict_and_the_next_step(
        evaluated: tuple[StoreAndCache, dict]) -> None:
    trained, _ = evaluated
    result = run_cli(trained, "registry", "register", "--run", TINY_RUN, "--model", "roses",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"registered roses:000001 from run {TINY_RUN} (test top-1 ")
    assert lines[0].endswith(f"at {trained.store.uri}/registry/roses/versions/000001/")
    assert lines[1] == "the gate would not promote it to production:"  # below 0.95
    assert lines[-1] == "next: flowerml registry promote roses 1"


def test_an_evaluation_of_older_weights_is_refused(evaluated: tuple[StoreAndCache, dict]
                                                   ) -> None:
    """Evaluated, then trained further: the card would claim the old weights' score."""
    trained, _ = evaluated
    store, _ = trained
    run = RunFiles(store, TINY_RUN)
    tensors, _ = run.load_weights()
    run.save_weights({k: v * 2 if v.is_floating_point() else v for k, v in tensors.items()},
                     epoch=2, valid_top1=1.0)
    assert_refused(run_cli(trained, "registry", "register", "--run", TINY_RUN),
                   "test evaluation is of other weights than its best ones now (it trained "
                   "further since): run flowerml evaluate --run tiny first")
    assert list(store.list("registry/")) == []


def test_a_bad_model_name_or_gate(evaluated: tuple[StoreAndCache, dict]) -> None:
    trained, _ = evaluated
    assert_refused(run_cli(trained, "registry", "register", "--run", TINY_RUN, "--model",
                           "Bad Name"), "Bad Name")
    assert_refused(run_cli(trained, "registry", "register", "--run", TINY_RUN, "--threshold",
                           "2"), "--threshold")
    assert list(trained.store.list("registry/")) == []
    assert DATASET == "flowers102"


def test_every_option_has_help() -> None:
    import click

    from flowerml.cli import cli

    command = cli.commands["registry"].commands["register"]
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert {"--run", "--store", "--json"} <= {opt for p in options for opt in p.opts}
    assert [p.name for p in options if not p.help] == []
