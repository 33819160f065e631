"""Promotion, in one place: the pure gate, the champion's fair score, and moving the alias.

- The gate (`Gate`, `Scorecard`, `decide_promotion`) is a pure function of two scorecards. When
  the candidate's scorecard carries its image-by-image comparison with the champion
  (`Scorecard.paired`, a `flowerml.comparison.Comparison`), the gate also refuses a candidate
  that McNemar's exact test finds significantly worse, or whose accuracy on some class falls
  more than `Gate.class_drop` below the champion's; without one (a model evaluated before
  evaluations kept per-image predictions) it says so and decides on top-1.
- Judging (`champion_scorecard`, `judge_candidate`) finds the score the candidate must beat:
  scores compare only on the same test manifest, so a champion measured on another one (the
  dataset changed) is re-evaluated on the current test split first; the per-image predictions
  of both sides are loaded here, never inside the gate.
- `promote` moves the alias by compare-and-swap and decides again, against the new champion's
  card, whenever another promotion moved the alias in between; `promote_version` is the
  operator's path (`flowerml registry promote`): judge on the candidate's own data, then promote.

The registry itself only keeps versions, aliases and their history; it never decides.
torch is imported only when a champion must be re-evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerml.comparison import (
    ClassDelta,
    Comparison,
    ComparisonError,
    PredictionSet,
    compare,
    run_predictions,
    version_predictions,
)
from flowerml.registry import DEFAULT_ALIAS, AliasMoved, AliasState, Registry, RegistryError

if TYPE_CHECKING:
    from flowerml.manifest import PublishedDataset
    from flowerml.storage import Store

# Scores are ratios like 5911/6149: compare with a hair of slack so that a candidate exactly at
# the threshold (or exactly `tolerance` below the champion) is not rejected by float rounding.
_EPSILON = 1e-9
SIGNIFICANCE = 0.05
"""McNemar's one-sided p below which a candidate counts as significantly worse."""
FLOOR_NAMES_LIMIT = 5


# --------------------------------------------------------------------------------------------
# The gate: pure


def _unit_interval(value: float, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RegistryError(f"{option} must be between 0 and 1 (got {value})")
    return float(value)


@dataclass(frozen=True)
class Gate:
    """Promotion rules: an absolute floor, how far below the champion a candidate may be, and
    how far below the champion's any one class's accuracy may fall."""

    threshold: float = 0.95
    tolerance: float = 0.005
    class_drop: float = 0.10

    def __post_init__(self) -> None:
        _unit_interval(self.threshold, "--threshold")
        _unit_interval(self.tolerance, "--tolerance")
        _unit_interval(self.class_drop, "--class-drop")


DEFAULT_GATE = Gate()


@dataclass(frozen=True)
class PairedUnavailable:
    """Why the candidate could not be compared image by image with `champion` (its label)."""

    champion: str
    reason: str


Paired = Comparison | PairedUnavailable


@dataclass(frozen=True)
class Scorecard:
    """What the gate compares: test top-1 and the test manifest it was measured on."""

    top1: float
    test_manifest_sha256: str
    version: int | None = None
    export_parity: bool | None = None
    """Whether the version's ONNX export passed parity; None when it has no export."""
    paired: Paired | None = None
    """A candidate's image-by-image comparison with the champion it is judged against (`a` the
    champion, `b` the candidate), or why there is none; None when nobody looked."""

    def __post_init__(self) -> None:
        if not isinstance(self.top1, int | float) or not 0 <= self.top1 <= 1:
            raise ValueError(f"top1 must be a fraction between 0 and 1 (got {self.top1})")

    @classmethod
    def from_card(cls, card: dict, version: int | None = None) -> Scorecard:
        """The scorecard a card records (`metrics.top1`, `test_manifest_sha256`)."""
        try:
            return cls(float(card["metrics"]["top1"]), str(card["test_manifest_sha256"]),
                       version)
        except (KeyError, TypeError, ValueError):
            where = f"version {version:06d}" if version else "the card"
            raise RegistryError(f"{where} records no metrics.top1 and test_manifest_sha256 "
                                "to compare against; pass its scorecard instead") from None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (for a Prefect task's result); `from_json` reads it back."""
        paired: dict[str, Any] | None = None
        if isinstance(self.paired, Comparison):
            paired = {"comparison": self.paired.to_json()}
        elif isinstance(self.paired, PairedUnavailable):
            paired = {"unavailable": {"champion": self.paired.champion,
                                      "reason": self.paired.reason}}
        return {"top1": self.top1, "test_manifest_sha256": self.test_manifest_sha256,
                "version": self.version, "export_parity": self.export_parity, "paired": paired}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Scorecard:
        paired = value.get("paired") or {}
        if "comparison" in paired:
            found: Paired | None = Comparison.from_json(paired["comparison"])
        elif "unavailable" in paired:
            found = PairedUnavailable(**paired["unavailable"])
        else:
            found = None
        return cls(value["top1"], value["test_manifest_sha256"], value.get("version"),
                   value.get("export_parity"), found)


def decide_promotion(candidate: Scorecard, champion: Scorecard | None, gate: Gate, *,
                     force: bool = False) -> tuple[bool, list[str]]:
    """Whether `candidate` may replace `champion`, with the reasons in words and numbers.

    Promote when test top-1 clears the threshold and, if there is a champion, is at most
    `gate.tolerance` below it; and, when `candidate.paired` compares the two image by image,
    McNemar's exact test does not find the candidate significantly worse (one-sided p <
    SIGNIFICANCE) and no class's accuracy falls more than `gate.class_drop` below the
    champion's. Scores are only comparable on the same test manifest, so a champion measured
    on another one raises ValueError: the caller re-evaluates it and calls again. `force`
    promotes regardless, and then a stale champion is only noted, not compared.
    """
    passes = candidate.top1 + _EPSILON >= gate.threshold
    sign = ">=" if passes else "<"
    reasons = [f"test top-1 {candidate.top1:.4f} {sign} threshold {gate.threshold:.4f}"]
    if champion is None:
        reasons.append("no production model yet: decided by the threshold alone")
    elif champion.test_manifest_sha256 != candidate.test_manifest_sha256:
        if not force:
            raise ValueError("champion was measured on a different test manifest: "
                             "re-evaluate it first")
        reasons.append("production was measured on a different test manifest: not compared")
    else:
        within, sentence = _compare(candidate, champion, gate.tolerance)
        paired_passes, paired_reasons = _paired_checks(candidate, champion, gate)
        passes = passes and within and paired_passes
        reasons += [sentence, *paired_reasons]
    if candidate.export_parity is False:
        passes = False
        reasons.append("its ONNX export failed the parity check (see export.json)")
    if force:
        return True, [*reasons, "forced: promoted regardless of the gate"]
    return passes, reasons


def _champion_name(champion: Scorecard) -> str:
    return f"production v{champion.version:06d}" if champion.version else "production"


def _compare(candidate: Scorecard, champion: Scorecard, tolerance: float) -> tuple[bool, str]:
    head = f"test top-1 {candidate.top1:.4f} vs {_champion_name(champion)} {champion.top1:.4f}"
    delta = candidate.top1 - champion.top1
    if delta + tolerance + _EPSILON >= 0:
        return True, f"{head}: {delta:+.4f} within tolerance {tolerance:.4f}"
    return False, f"{head}: regression of {-delta:.4f} beyond tolerance {tolerance:.4f}"


def _paired_checks(candidate: Scorecard, champion: Scorecard,
                   gate: Gate) -> tuple[bool, list[str]]:
    paired = candidate.paired
    if paired is None:
        return True, ["paired test not run: no per-image predictions were given; decided on "
                      "top-1 alone"]
    if isinstance(paired, PairedUnavailable):
        return True, [f"paired test not run: {paired.reason}; decided on top-1 alone"]
    if paired.manifest_sha256 != candidate.test_manifest_sha256:
        raise ValueError("the paired comparison was made on another test manifest than the "
                         "candidate's score")
    name = _champion_name(champion)
    significant, mcnemar = _mcnemar(paired, name)
    below = classes_below_floor(paired, gate.class_drop)
    return not significant and not below, [mcnemar, _floor_sentence(below, name,
                                                                     gate.class_drop)]


def _mcnemar(paired: Comparison, name: str) -> tuple[bool, str]:
    p = paired.p_b_worse
    significant = p < SIGNIFICANCE
    verdict = (f"< {SIGNIFICANCE:g}: significantly worse" if significant
               else f">= {SIGNIFICANCE:g}: not significantly worse")
    return significant, (
        f"McNemar exact test vs {name}: right where it was wrong on {paired.b_only:,} images, "
        f"wrong where it was right on {paired.a_only:,} (of {paired.n:,}; agreement "
        f"{paired.agreement:.2%}); one-sided p = {p:.4g} {verdict}")


def classes_below_floor(paired: Comparison, class_drop: float) -> list[ClassDelta]:
    """The classes whose accuracy under the candidate (`b`) is more than `class_drop` below
    the champion's (`a`), largest drop first."""
    below = [c for c in paired.per_class if -c.delta > class_drop + _EPSILON]
    return sorted(below, key=lambda c: (c.delta, c.label))


def _floor_sentence(below: list[ClassDelta], name: str, class_drop: float) -> str:
    if not below:
        return f"per-class floor: no class drops more than {class_drop:.2f} below {name}"
    named = ", ".join(f"{c.label} {c.name} {c.a_accuracy:.4f} -> {c.b_accuracy:.4f}"
                      for c in below[:FLOOR_NAMES_LIMIT])
    more = f" and {len(below) - FLOOR_NAMES_LIMIT} more" if len(below) > FLOOR_NAMES_LIMIT \
        else ""
    counted = f"{len(below)} classes drop" if len(below) > 1 else "1 class drops"
    return f"per-class floor: {counted} more than {class_drop:.2f} below {name}: {named}{more}"


def paired_figures(paired: Paired | None, gate: Gate) -> dict[str, Any] | None:
    """The paired test's figures as plain JSON, for the card, the Prefect report and
    `registry show`; None when there was no champion to compare with."""
    if paired is None:
        return None
    if isinstance(paired, PairedUnavailable):
        return {"champion": paired.champion, "ran": False, "reason": paired.reason}
    below = classes_below_floor(paired, gate.class_drop)
    return {"champion": paired.a, "ran": True, "n": paired.n,
            "candidate_only": paired.b_only, "champion_only": paired.a_only,
            "agreement": paired.agreement, "p_worse": paired.p_b_worse,
            "significance": SIGNIFICANCE, "significantly_worse": paired.p_b_worse < SIGNIFICANCE,
            "class_drop": gate.class_drop,
            "classes_below_floor": [{"label": c.label, "name": c.name, "support": c.support,
                                     "champion": c.a_accuracy, "candidate": c.b_accuracy}
                                    for c in below]}


# --------------------------------------------------------------------------------------------
# Judging: the score to beat, measured fairly, and both sides' per-image predictions


@dataclass(frozen=True)
class Champion:
    """The alias's model measured on the candidate's test manifest: its scorecard, and its
    per-image predictions there (or why there are none)."""

    label: str
    scorecard: Scorecard
    predictions: PredictionSet | str  # a str says why there are none


def measure_champion(registry: Registry, published: PublishedDataset, *, alias: str,
                     cache_dir: Path, device: str = "auto",
                     workers: int | None = None) -> Champion | None:
    """The alias's model on this test manifest: read from its card and stored predictions
    when it was measured there, re-evaluated otherwise; None when the alias is unset."""
    state = registry.alias(alias)
    if state is None:
        return None
    champion = registry.require_committed(state.version)
    card = champion.card
    if card.get("test_manifest_sha256") == published.manifest_sha256:
        return Champion(champion.label, Scorecard.from_card(card, champion.version),
                        _loaded(version_predictions, registry, champion.version))
    top1, predictions = _evaluate_version(registry, champion.version, published,
                                          cache_dir=cache_dir, device=device, workers=workers)
    return Champion(champion.label, Scorecard(top1, published.manifest_sha256,
                                              champion.version), predictions)


def champion_scorecard(registry: Registry, published: PublishedDataset, *, alias: str,
                       cache_dir: Path, device: str = "auto",
                       workers: int | None = None) -> Scorecard | None:
    """The alias's model's score on this test manifest (re-evaluated if it differs)."""
    champion = measure_champion(registry, published, alias=alias, cache_dir=cache_dir,
                                device=device, workers=workers)
    return champion.scorecard if champion else None


def _loaded(load: Callable[..., PredictionSet], *args: Any) -> PredictionSet | str:
    """Stored predictions, or why they cannot be had (the gate then decides on top-1)."""
    try:
        return load(*args)
    except ComparisonError as error:
        return str(error)


def _evaluate_version(registry: Registry, version: int, published: PublishedDataset, *,
                      cache_dir: Path, device: str, workers: int | None
                      ) -> tuple[float, PredictionSet]:
    """Test top-1 and per-image predictions of a registered version on `published` (its
    weights checksum-verified)."""
    from flowerml.comparison import prediction_rows
    from flowerml.inference import evaluate_model
    from flowerml.release import load_version

    trained = load_version(registry, version, device)
    metrics = evaluate_model(trained, registry.store, published, cache_dir=cache_dir,
                             workers=workers)
    keys = [entry.key for entry in published.split_files("test")]
    rows = prediction_rows(keys, metrics.predictions) if metrics.predictions else []
    return metrics.top1, PredictionSet(
        trained.source, f"{published.dataset}@{published.version}", published.manifest_sha256,
        "test", trained.weights_sha256, trained.class_names, tuple(rows))


def pair_with_champion(champion: Champion, candidate: PredictionSet | str) -> Paired:
    """The candidate compared image by image with the champion, or why it could not be."""
    for side in (champion.predictions, candidate):
        if isinstance(side, str):
            return PairedUnavailable(champion.label, side)
    try:
        return compare(champion.predictions, candidate)
    except ComparisonError as error:
        return PairedUnavailable(champion.label, str(error))


def judge_candidate(store: Store, model: str, alias: str, top1: float, dataset: str,
                    version: str, gate: Gate, *, force: bool, cache_dir: Path,
                    device: str = "auto", run_id: str | None = None
                    ) -> tuple[bool, list[str], Scorecard, Scorecard | None]:
    """The gate's verdict on a candidate's test top-1 (on `dataset@version`) against the
    alias's current model; returns (promote, reasons, candidate, champion) so that `promote`
    can later re-decide without evaluating the champion again. With `run_id`, the run's stored
    test predictions are compared image by image with the champion's (`candidate.paired`)."""
    from flowerml.manifest import resolve_dataset

    published = resolve_dataset(store, dataset, version)
    champion = measure_champion(Registry(store, model), published, alias=alias,
                                cache_dir=cache_dir, device=device)
    candidate = Scorecard(top1, published.manifest_sha256)
    if champion is not None and run_id is not None:
        candidate = replace(candidate, paired=pair_with_champion(
            champion, _loaded(run_predictions, store, run_id)))
    promote, reasons = decide_promotion(candidate, champion.scorecard if champion else None,
                                        gate, force=force)
    return promote, reasons, candidate, champion.scorecard if champion else None


# --------------------------------------------------------------------------------------------
# Promoting: the gate, then the alias moved by compare-and-swap


def promote(registry: Registry, version: int, *, scorecard: Scorecard,
            champion: Scorecard | None = None, gate: Gate = DEFAULT_GATE,
            alias: str = DEFAULT_ALIAS, force: bool = False
            ) -> tuple[bool, list[str], AliasState | None]:
    """Run the gate, and move `alias` to `version` when it passes.

    `champion` is the scorecard of the version the alias points at, measured on the same
    test manifest as `scorecard` (a champion without a version is taken to describe the
    alias as first read). The decision holds only for that champion: if the alias moves
    while we try (another promotion won), we decide again against the new champion, whose
    scorecard then comes from its card (`Scorecard.from_card`). A new champion measured on
    another manifest raises ValueError, like `decide_promotion`: re-evaluate and call again.
    The paired comparison is the scorecard's when it is against the champion decided on;
    otherwise it is made from both versions' stored predictions.
    """
    registry.require_committed(version)  # set_alias verifies the weights before any move
    candidate = replace(scorecard, version=version if scorecard.version is None
                        else scorecard.version, export_parity=export_parity(registry, version))
    current = registry.alias(alias)
    if champion is not None and champion.version is None and current is not None:
        champion = replace(champion, version=current.version)
    while True:
        deciding = _champion(registry, current, champion)
        promoted, reasons = decide_promotion(
            _paired_against(registry, candidate, version, deciding), deciding, gate,
            force=force)
        if not promoted:
            return False, reasons, None
        if current is not None and current.version == version:
            return True, [*reasons, f"v{version:06d} is already {alias}: nothing to move"], \
                current
        try:
            state = registry.set_alias(alias, version, reason="promote: " + "; ".join(reasons),
                                       forced=force, expect_seq=current.seq if current else 0)
            return True, reasons, state
        except AliasMoved as moved:
            current = moved.current


def _paired_against(registry: Registry, candidate: Scorecard, version: int,
                    champion: Scorecard | None) -> Scorecard:
    """The candidate with its paired comparison against `champion`: its own when it is about
    that version, else one made from the two versions' stored predictions."""
    if champion is None or champion.version is None or champion.version == version:
        return candidate
    label = registry.get(champion.version).label
    paired = candidate.paired
    if paired is not None and label == (paired.a if isinstance(paired, Comparison)
                                        else paired.champion):
        return candidate
    held = Champion(label, champion, _loaded(version_predictions, registry, champion.version))
    return replace(candidate, paired=pair_with_champion(
        held, _loaded(version_predictions, registry, version)))


def export_parity(registry: Registry, version: int) -> bool | None:
    """Whether the version's ONNX export passed parity (None: never exported)."""
    from flowerml.export import read_export

    record = read_export(registry, version)
    return None if record is None else bool(record.get("parity", {}).get("passed"))


def _champion(registry: Registry, current: AliasState | None,
              champion: Scorecard | None) -> Scorecard | None:
    if current is None:
        return None
    if champion is not None and champion.version == current.version:
        return champion
    return Scorecard.from_card(registry.get(current.version).card, current.version)


def promote_version(registry: Registry, version: int, *, alias: str, gate: Gate, force: bool,
                    cache_dir: Path, device: str = "auto"
                    ) -> tuple[bool, list[str], AliasState | None]:
    """`flowerml registry promote`: the gate against the current alias, on the candidate's
    data (the champion re-evaluated there if it was measured elsewhere), then `promote`."""
    from flowerml.manifest import resolve_dataset

    candidate = registry.require_committed(version)
    registry.verify(version)  # refuse bad weights before any evaluation work
    lineage = candidate.card["lineage"]
    published = resolve_dataset(registry.store, lineage["dataset"], lineage["dataset_version"])
    champion = measure_champion(registry, published, alias=alias, cache_dir=cache_dir,
                                device=device)
    scorecard = Scorecard.from_card(candidate.card, version)
    if champion is not None and champion.scorecard.version != version:
        scorecard = replace(scorecard, paired=pair_with_champion(
            champion, _loaded(version_predictions, registry, version)))
    return promote(registry, version, scorecard=scorecard,
                   champion=champion.scorecard if champion else None, gate=gate, alias=alias,
                   force=force)
