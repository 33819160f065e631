"""Promotion, in one place: the pure gate, the champion's fair score, and moving the alias.

- The gate (`Gate`, `Scorecard`, `decide_promotion`) is a pure function of two scorecards.
- Judging (`champion_scorecard`, `judge_candidate`) finds the score the candidate must beat:
  scores compare only on the same test manifest, so a champion measured on another one (the
  dataset changed) is re-evaluated on the current test split first.
- `promote` moves the alias by compare-and-swap and decides again, against the new champion's
  card, whenever another promotion moved the alias in between; `promote_version` is the
  operator's path (`flowerml registry promote`): judge on the candidate's own data, then promote.

The registry itself only keeps versions, aliases and their history; it never decides.
torch is imported only when a champion must be re-evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flowerml.registry import DEFAULT_ALIAS, AliasMoved, AliasState, Registry, RegistryError

if TYPE_CHECKING:
    from flowerml.manifest import PublishedDataset
    from flowerml.storage import Store

# Scores are ratios like 5911/6149: compare with a hair of slack so that a candidate exactly at
# the threshold (or exactly `tolerance` below the champion) is not rejected by float rounding.
_EPSILON = 1e-9


# --------------------------------------------------------------------------------------------
# The gate: pure


def _unit_interval(value: float, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RegistryError(f"{option} must be between 0 and 1 (got {value})")
    return float(value)


@dataclass(frozen=True)
class Gate:
    """Promotion rules: an absolute floor and how far below the champion a candidate may be."""

    threshold: float = 0.95
    tolerance: float = 0.005

    def __post_init__(self) -> None:
        _unit_interval(self.threshold, "--threshold")
        _unit_interval(self.tolerance, "--tolerance")


DEFAULT_GATE = Gate()


@dataclass(frozen=True)
class Scorecard:
    """What the gate compares: test top-1 and the test manifest it was measured on."""

    top1: float
    test_manifest_sha256: str
    version: int | None = None
    export_parity: bool | None = None
    """Whether the version's ONNX export passed parity; None when it has no export."""

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


def decide_promotion(candidate: Scorecard, champion: Scorecard | None, gate: Gate, *,
                     force: bool = False) -> tuple[bool, list[str]]:
    """Whether `candidate` may replace `champion`, with the reasons in words and numbers.

    Promote when test top-1 clears the threshold and, if there is a champion, is at most
    `gate.tolerance` below it. Scores are only comparable on the same test manifest, so a
    champion measured on another one raises ValueError: the caller re-evaluates it and calls
    again. `force` promotes regardless, and then a stale champion is only noted, not compared.
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
        passes = passes and within
        reasons.append(sentence)
    if candidate.export_parity is False:
        passes = False
        reasons.append("its ONNX export failed the parity check (see export.json)")
    if force:
        return True, [*reasons, "forced: promoted regardless of the gate"]
    return passes, reasons


def _compare(candidate: Scorecard, champion: Scorecard, tolerance: float) -> tuple[bool, str]:
    name = f"production v{champion.version:06d}" if champion.version else "production"
    head = f"test top-1 {candidate.top1:.4f} vs {name} {champion.top1:.4f}"
    delta = candidate.top1 - champion.top1
    if delta + tolerance + _EPSILON >= 0:
        return True, f"{head}: {delta:+.4f} within tolerance {tolerance:.4f}"
    return False, f"{head}: regression of {-delta:.4f} beyond tolerance {tolerance:.4f}"


# --------------------------------------------------------------------------------------------
# Judging: the score to beat, measured fairly


def champion_scorecard(registry: Registry, published: PublishedDataset, *, alias: str,
                       cache_dir: Path, device: str = "auto",
                       workers: int | None = None) -> Scorecard | None:
    """The alias's model's score on this test manifest (re-evaluated if it differs)."""
    state = registry.alias(alias)
    if state is None:
        return None
    champion = registry.require_committed(state.version)
    card = champion.card
    if card.get("test_manifest_sha256") == published.manifest_sha256:
        return Scorecard.from_card(card, champion.version)
    top1 = _evaluate_version(registry, champion.version, published, cache_dir=cache_dir,
                             device=device, workers=workers)
    return Scorecard(top1, published.manifest_sha256, champion.version)


def _evaluate_version(registry: Registry, version: int, published: PublishedDataset, *,
                      cache_dir: Path, device: str, workers: int | None) -> float:
    """Test top-1 of a registered version on `published` (its weights checksum-verified)."""
    from flowerml.inference import evaluate_model
    from flowerml.release import load_version

    trained = load_version(registry, version, device)
    return evaluate_model(trained, registry.store, published, cache_dir=cache_dir,
                          workers=workers).top1


def judge_candidate(store: Store, model: str, alias: str, top1: float, dataset: str,
                    version: str, gate: Gate, *, force: bool, cache_dir: Path,
                    device: str = "auto") -> tuple[bool, list[str], Scorecard, Scorecard | None]:
    """The gate's verdict on a candidate's test top-1 (on `dataset@version`) against the
    alias's current model; returns (promote, reasons, candidate, champion) so that `promote`
    can later re-decide without evaluating the champion again."""
    from flowerml.manifest import resolve_dataset

    published = resolve_dataset(store, dataset, version)
    champion = champion_scorecard(Registry(store, model), published, alias=alias,
                                  cache_dir=cache_dir, device=device)
    candidate = Scorecard(top1, published.manifest_sha256)
    promote, reasons = decide_promotion(candidate, champion, gate, force=force)
    return promote, reasons, candidate, champion


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
    """
    registry.require_committed(version)  # set_alias verifies the weights before any move
    candidate = replace(scorecard, version=version if scorecard.version is None
                        else scorecard.version, export_parity=export_parity(registry, version))
    current = registry.alias(alias)
    if champion is not None and champion.version is None and current is not None:
        champion = replace(champion, version=current.version)
    while True:
        promoted, reasons = decide_promotion(
            candidate, _champion(registry, current, champion), gate, force=force)
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
    champion = champion_scorecard(registry, published, alias=alias, cache_dir=cache_dir,
                                  device=device)
    return promote(registry, version, scorecard=Scorecard.from_card(candidate.card, version),
                   champion=champion, gate=gate, alias=alias, force=force)
