"""The retrain flow end to end under Prefect's harness, on a moto S3 store.

One story, in order: the first run promotes; a run under a higher threshold registers but does
not promote; a worse candidate is rejected with its reason; a forced promotion is recorded and
rolled back; a failure inside register leaves no COMMITTED version and the alias unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import flows.retrain as retrain_module
from flowerml.registry import Registry
from flowerml.storage import S3Options, S3Store
from flows.retrain import RetrainParams, retrain_flowers
from tasks.registry import register_task

GOOD = {"recipe": "demo", "epochs": 8, "image_size": 40, "batch_size": 8, "device": "cpu",
        "workers": 0}
BAD = {**GOOD, "epochs": 1, "lr": 1e-7}


@pytest.fixture
def story(prefect_harness: None, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str,
          s3_bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from flowerml.synthetic import SyntheticSpec, write_synthetic_archive

    source = tmp_path / "src"
    write_synthetic_archive(source, SyntheticSpec(classes=4, per_class=16, image_size=56, seed=7))
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "ml", S3Options(endpoint_url=moto_endpoint))

    def run(training: dict, **gate) -> dict:
        params = RetrainParams(source=str(source), store=f"s3://{s3_bucket}/ml",
                               training=training, gate={"threshold": 0.5, **gate})
        return retrain_flowers(params)

    return run, Registry(store, "flowers102")


def test_retrain_story(story, monkeypatch: pytest.MonkeyPatch) -> None:
    run, registry = story

    first = run(GOOD)
    assert first["promoted"] and first["version"] == 1, first["reasons"]
    assert "no production model yet: decided by the threshold alone" in first["reasons"]
    assert registry.alias().version == 1
    card = registry.get(1).card
    assert card["lineage"]["run_id"] == first["run_id"]
    assert card["metrics"]["top1"] == first["metrics"]["top1"]
    assert card["gate"]["promote"] is True and card["software"]["torch"]

    strict = run(GOOD, threshold=0.999)
    assert not strict["promoted"] and strict["version"] == 2
    assert any("below threshold 0.9990" in r or "< threshold 0.9990" in r
               for r in strict["reasons"]), strict["reasons"]
    assert registry.get(2).committed and registry.alias().version == 1

    worse = run(BAD, threshold=0.0)
    assert not worse["promoted"] and worse["version"] == 3
    assert worse["metrics"]["top1"] < first["metrics"]["top1"] - 0.005
    assert any("regression" in r for r in worse["reasons"]), worse["reasons"]
    assert registry.alias().version == 1

    forced = run(BAD, threshold=0.0, force=True)
    assert forced["promoted"] and registry.alias().version == forced["version"] == 4
    history = registry.history()
    assert history[-1]["forced"] is True and history[-1]["to"] == 4

    restored = registry.rollback()
    assert restored.version == 1 and registry.history()[-1]["to"] == 1

    original_register = Registry.register
    monkeypatch.setattr(Registry, "register", lambda self, *a, **k: original_register(
        self, *a, **{**k, "fail_before_commit": True}))
    monkeypatch.setattr(retrain_module, "register_task", register_task.with_options(retries=0))
    alias_before = registry.alias()
    with pytest.raises(RuntimeError):
        run(GOOD, threshold=0.0, force=True)
    assert registry.alias() == alias_before
    newest = registry.versions()[-1]
    assert newest.version == 5 and not newest.committed
