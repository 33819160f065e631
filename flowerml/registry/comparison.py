"""Two models compared image by image, from the per-image predictions evaluation stored
(`flowerml.evaluation.predictions`).

`compare(a, b)` pairs two models' predictions on the same manifest: how often they agree, the
discordant pairs (one right where the other is wrong) and McNemar's exact test on them, and the
per-class accuracies; everything is said of `b` relative to `a`. Models measured on different
manifests are refused, naming both. The champion gate (`flowerml.registry.gates`) compares a candidate (`b`)
with the production model (`a`) this way.

References: `run:ID` is a run's test evaluation; `NAME:V` a registry version; `NAME@ALIAS` the
version an alias points at (`NAME` alone: production). scipy is imported only for a p-value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowerml.core.documents import read_document
from flowerml.evaluation.predictions import (
    METRICS_FILE,
    RUN_PREFIX,
    ComparisonError,
    EvaluationMetrics,
    PredictionSet,
    read_prediction_set,
    run_predictions,
)
from flowerml.io.storage import Store
from flowerml.registry.aliases import DamagedRegistryDocument
from flowerml.registry.names import parse_model_ref
from flowerml.registry.versions import Registry


class DifferentManifests(ComparisonError):
    """Two models measured on different test manifests: their images are not the same."""

    kind = "refused"


def version_predictions(registry: Registry, version: int) -> PredictionSet:
    """The test predictions a registry version was registered with."""
    found = registry.require_committed(version)
    run_id = found.card.get("lineage", {}).get("run_id")
    fix = (f"evaluate its run again (flowerml evaluate --run {run_id}) and compare "
           f"{RUN_PREFIX}{run_id} instead" if run_id else "evaluate its run again")
    metrics_bytes = registry.read_attachment(version, METRICS_FILE)
    metrics_file = registry.store.location(registry.attachment_key(version, METRICS_FILE))
    metrics = None if metrics_bytes is None else read_document(
        EvaluationMetrics, metrics_bytes, metrics_file, DamagedRegistryDocument)
    folder = metrics_file.rsplit("/", 1)[0]
    loaded = read_prediction_set(
        metrics, lambda name: registry.read_attachment(version, name), source=found.label,
        where=folder, class_names=[c["name"] for c in found.card.get("classes", [])], fix=fix)
    if loaded.weights_sha256 != found.weights_sha256:
        raise ComparisonError(f"{found.label}: its stored predictions are of other weights "
                              f"({loaded.weights_sha256[:12]}) than the version's "
                              f"({found.weights_sha256[:12]})")
    return loaded


def resolve_predictions(store: Store, ref: str) -> PredictionSet:
    """The stored test predictions `ref` names: run:ID, NAME:V, NAME@ALIAS or NAME."""
    if ref.startswith(RUN_PREFIX):
        return run_predictions(store, ref.removeprefix(RUN_PREFIX))
    model, alias, version = parse_model_ref(ref)
    registry = Registry(store, model)
    return version_predictions(registry, registry.resolve(alias, version).version)


# --------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class ClassDelta:
    """One class's accuracy under both models (on the same images)."""

    label: int
    name: str
    support: int
    a_accuracy: float
    b_accuracy: float

    @property
    def delta(self) -> float:
        return self.b_accuracy - self.a_accuracy


@dataclass(frozen=True)
class Comparison:
    """Model `b` against model `a` on the same images. `a_only` counts the images only `a` got
    right, `b_only` those only `b` got right (the discordant pairs); `agree` those where both
    predicted the same label, right or wrong."""

    a: str
    b: str
    dataset: str
    manifest_sha256: str
    split: str
    n: int
    both_right: int
    a_only: int
    b_only: int
    both_wrong: int
    agree: int
    per_class: tuple[ClassDelta, ...]

    @property
    def a_top1(self) -> float:
        return (self.both_right + self.a_only) / self.n

    @property
    def b_top1(self) -> float:
        return (self.both_right + self.b_only) / self.n

    @property
    def agreement(self) -> float:
        return self.agree / self.n

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    @property
    def p_two_sided(self) -> float:
        """McNemar's exact test: are the two models' error rates different?"""
        return mcnemar_exact(self.b_only, self.a_only, "two-sided")

    @property
    def p_b_worse(self) -> float:
        """One-sided: the chance of `b` winning this few discordant pairs if it were as good."""
        return mcnemar_exact(self.b_only, self.a_only, "less")

    @property
    def p_b_better(self) -> float:
        return mcnemar_exact(self.b_only, self.a_only, "greater")

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "dataset": self.dataset,
                "manifest_sha256": self.manifest_sha256, "split": self.split, "n": self.n,
                "both_right": self.both_right, "a_only": self.a_only, "b_only": self.b_only,
                "both_wrong": self.both_wrong, "agree": self.agree,
                "agreement": self.agreement, "a_top1": self.a_top1, "b_top1": self.b_top1,
                "discordant": self.discordant, "mcnemar_p": self.p_two_sided,
                "p_b_worse": self.p_b_worse, "p_b_better": self.p_b_better,
                "per_class": [{"label": c.label, "name": c.name, "support": c.support,
                               "a_accuracy": c.a_accuracy, "b_accuracy": c.b_accuracy,
                               "delta": c.delta} for c in self.per_class]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Comparison:
        """The comparison `to_json` wrote (derived figures are computed again)."""
        fields = {name: value[name] for name in cls.__dataclass_fields__ if name != "per_class"}
        per_class = tuple(ClassDelta(c["label"], c["name"], c["support"], c["a_accuracy"],
                                     c["b_accuracy"]) for c in value["per_class"])
        return cls(**fields, per_class=per_class)


def mcnemar_exact(wins: int, losses: int, alternative: str = "two-sided") -> float:
    """McNemar's exact test on the discordant pairs: `wins` (b right, a wrong) against `losses`
    (a right, b wrong) as a binomial with p = 1/2. alternative "less": b is worse; "greater":
    b is better. No discordant pair at all is no evidence either way (p = 1)."""
    if wins + losses == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses, 0.5, alternative=alternative).pvalue)


def check_same_images(a: PredictionSet, b: PredictionSet) -> None:
    """Refuse two prediction sets that were not measured on the same manifest and split."""
    if (a.manifest_sha256, a.split) != (b.manifest_sha256, b.split):
        raise DifferentManifests(
            f"{a.source} was evaluated on {_measured_on(a)} and {b.source} on "
            f"{_measured_on(b)}: a paired comparison needs the same images; evaluate one run "
            "on the other's dataset version (flowerml evaluate --run ID --dataset-version V)")


def _measured_on(predictions: PredictionSet) -> str:
    return (f"{predictions.dataset} {predictions.split} (manifest "
            f"{predictions.manifest_sha256[:12]})")


def compare(a: PredictionSet, b: PredictionSet) -> Comparison:
    """`b` against `a`, image by image, on the same manifest (else DifferentManifests)."""
    check_same_images(a, b)
    by_key = {row.key: row for row in b.images}
    if len(by_key) != len(b.images) or set(by_key) != {row.key for row in a.images} \
            or len(a.images) != len(b.images):
        raise ComparisonError(f"{a.source} and {b.source} hold predictions for different "
                              f"images of {a.dataset} {a.split}: evaluate them again")
    counts = {"both_right": 0, "a_only": 0, "b_only": 0, "both_wrong": 0, "agree": 0}
    per_class: dict[int, list[int]] = {}  # label -> [support, a right, b right]
    for first in a.images:
        second = by_key[first.key]
        if second.label != first.label:
            raise ComparisonError(f"{a.source} and {b.source} disagree on the label of "
                                  f"{first.key}: evaluate them again")
        counts[_outcome(first.correct, second.correct)] += 1
        counts["agree"] += first.predicted == second.predicted
        tally = per_class.setdefault(first.label, [0, 0, 0])
        tally[0] += 1
        tally[1] += first.correct
        tally[2] += second.correct
    return Comparison(a.source, b.source, a.dataset, a.manifest_sha256, a.split, len(a.images),
                      per_class=_class_deltas(per_class, a.class_names), **counts)


def _outcome(a_correct: bool, b_correct: bool) -> str:
    if a_correct:
        return "both_right" if b_correct else "a_only"
    return "b_only" if b_correct else "both_wrong"


def _class_deltas(per_class: dict[int, list[int]],
                  names: Sequence[str]) -> tuple[ClassDelta, ...]:
    return tuple(ClassDelta(label, names[label - 1] if label <= len(names) else str(label),
                            support, a_right / support, b_right / support)
                 for label, (support, a_right, b_right) in sorted(per_class.items()))


def biggest_changes(comparison: Comparison, limit: int = 10) -> list[ClassDelta]:
    """The classes whose accuracy changed, largest change first (drops before gains on ties)."""
    changed = [c for c in comparison.per_class if c.delta != 0]
    return sorted(changed, key=lambda c: (-abs(c.delta), c.delta, c.label))[:limit]
