"""flowerml.serving.scoring_drift through a scoring run: the version's test baseline (stored by
evaluation, or computed from its stored predictions), `_SUCCESS.json`'s histograms and PSIs
(the version's own test images near 0, a greyscale copy far), and review.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flowerml.data.manifest import resolve_dataset
from flowerml.evaluation.drift import baseline_histograms
from flowerml.evaluation.predictions import METRICS_FILE
from flowerml.io.storage_local import LocalStore
from flowerml.registry.comparison import version_predictions
from flowerml.registry.versions import Registry
from flowerml.serving.scoring import SUCCESS, score_collection
from flowerml.serving.scoring_drift import REVIEW, version_baseline
from flowerml.serving.scoring_plan import ScoringRequest
from tests.helpers.registries import registry_copy
from tests.helpers.scoring import PHOTO_KEYS, rows_in_folder, write_photos
from tests.helpers.stores import replace_file
from tests.helpers.synthetic import DATASET, RegisteredRun


@pytest.fixture
def registry(registered_run: RegisteredRun, tmp_path: Path) -> Registry:
    """A test's own copy of the registered tiny run (scored with torch: no export needed)."""
    return registry_copy(registered_run, tmp_path / "registry")[0]


@pytest.fixture(scope="module")
def test_images(registered_run: RegisteredRun,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The version's own test split as image files, and a greyscale copy of each."""
    store = registered_run.store
    published = resolve_dataset(store, DATASET)
    own, grey = tmp_path_factory.mktemp("own-test"), tmp_path_factory.mktemp("grey-test")
    for entry in published.split_files("test"):
        name = entry.key.replace("/", "_")
        (own / name).write_bytes(store.get_bytes(published.object_key(entry)))
        Image.open(own / name).convert("L").convert("RGB").save(grey / name, format="JPEG")
    return own, grey


def score(registry: Registry, input: Path, output: Path, **options) -> dict:
    request = ScoringRequest(input=str(input), model="flowers102@production", output=str(output),
                             shard_size=options.pop("shard_size", 10), runtime="torch",
                             **options)
    return score_collection(request, registry_store=registry.store,
                            output_store=LocalStore(output))


def test_evaluation_stores_the_baseline_and_an_older_version_gets_it_from_predictions(
        registry: Registry) -> None:
    stored = json.loads(registry.read_attachment(1, METRICS_FILE))
    predictions = version_predictions(registry, 1)
    computed = baseline_histograms(predictions.images, len(predictions.class_names))
    assert stored["baseline"] == computed.model_dump()
    assert computed.images == len(predictions.images) == sum(computed.confidence) == 24
    assert len(computed.classes) == 4 and len(computed.confidence) == 10

    del stored["baseline"]  # as registered before evaluation kept a baseline
    replace_file(registry.store.root / registry.attachment_key(1, METRICS_FILE),
                 json.dumps(stored).encode())
    assert version_baseline(registry, 1) == computed


def test_success_carries_the_histograms_and_psis_near_zero_for_the_own_test_split_far_for_grey(
        registry: Registry, test_images: tuple[Path, Path], tmp_path: Path) -> None:
    own, grey = test_images
    baseline = version_baseline(registry, 1)
    same = score(registry, own, tmp_path / "own")
    drift = same["drift"]
    assert drift["baseline"] == baseline.model_dump()
    assert drift["scored"]["images"] == 24 and sum(drift["scored"]["classes"]) == 24
    assert drift["threshold"] == 0.2
    shifted = score(registry, grey, tmp_path / "grey")["drift"]
    print(f"PSI own test split: top-1 probability {drift['psi_confidence']:.4f}, predicted "
          f"class {drift['psi_classes']:.4f}; greyscale copy: {shifted['psi_confidence']:.4f}, "
          f"{shifted['psi_classes']:.4f}")
    assert max(drift["psi_confidence"], drift["psi_classes"]) < 0.1 and not drift["drifted"]
    assert max(shifted["psi_confidence"], shifted["psi_classes"]) > 0.2 and shifted["drifted"]
    assert json.loads((Path(same["output"]) / SUCCESS).read_text()) == same


def test_a_version_without_stored_predictions_is_scored_and_says_why_there_is_no_drift(
        registry: Registry, test_images: tuple[Path, Path], tmp_path: Path) -> None:
    for name in (METRICS_FILE, "predictions.jsonl"):
        (registry.store.root / registry.attachment_key(1, name)).unlink()
    summary = score(registry, test_images[0], tmp_path / "scores")
    assert summary["scored"] == 24 and "drift" not in summary
    assert summary["drift_unavailable"].startswith(
        "flowers102:000001 has no stored per-image predictions")


def test_review_below_lists_the_least_sure_images_first_with_their_full_location(
        registry: Registry, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos")
    everything = score(registry, photos, tmp_path / "all", review_below=1.0)
    rows = [row for row in rows_in_folder(everything) if "error" not in row]
    top1 = sorted(row["probabilities"][0] for row in rows)
    cut = (top1[2] + top1[3]) / 2  # the three least sure images are below it
    summary = score(registry, photos, tmp_path / "some", review_below=cut)
    review_file = Path(summary["output"]) / REVIEW
    assert summary["review"] == {"file": str(review_file), "below": cut, "images": 3}
    review = [json.loads(line) for line in review_file.read_text().splitlines()]
    assert [row["probability"] for row in review] == top1[:3]
    by_key = {row["key"]: row for row in rows}
    for row in review:
        assert row["path"] == str(photos / row["key"]) and row["label"] is None
        scored = by_key[row["key"]]
        assert (row["labels"], row["names"], row["probabilities"]) == (
            scored["labels"], scored["names"], scored["probabilities"])
    assert {row["key"] for row in review} <= set(PHOTO_KEYS) - {"cut.jpg"}
    assert everything["review"]["images"] == len(rows)
    unasked = score(registry, photos, tmp_path / "none")
    assert "review" not in unasked and not (Path(unasked["output"]) / REVIEW).exists()
