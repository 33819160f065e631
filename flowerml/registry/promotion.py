"""Promotion, in one place: the champion's fair score, and promoting a version past its gate.

- Judging (`champion_scorecard`, `judge_candidate`) finds the score the candidate must beat:
  scores compare only on the same test manifest, so a champion measured on another one (the
  dataset changed) is re-evaluated on the current test split first; the per-image predictions
  of both sides are loaded here, never inside the gate (`flowerml.registry.gates`).
- `promote` moves the alias past the champion gate, deciding again, against the new champion's
  card, whenever another promotion moved the alias in between; `promote_version` is the
  operator's path (`flowerml registry promote`): judge on the candidate's own data, then
  promote.
- A distilled student is promoted on its own gate: `promote_student_version` (the operator's
  path, on the figures its card recorded at release) and `promote_released_student` (the
  release's, which leaves a newer version behind the alias where it is).

Both kinds move the alias with `gates.move_alias`. torch is imported only when a champion must
be re-evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowerml.evaluation.predictions import ComparisonError, PredictionSet, run_predictions
from flowerml.registry.aliases import AliasState
from flowerml.registry.comparison import Comparison, compare, version_predictions
from flowerml.registry.gates import (
    DEFAULT_GATE,
    Gate,
    GateError,
    GateScore,
    Paired,
    PairedUnavailable,
    Scorecard,
    StudentGate,
    Verdict,
    decide_promotion,
    decide_student,
    is_student_card,
    move_alias,
)
from flowerml.registry.names import DEFAULT_ALIAS
from flowerml.registry.versions import Registry

if TYPE_CHECKING:
    from flowerml.data.manifest import PublishedDataset
    from flowerml.io.storage import Store


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
    if card.get("test_manifest_sha256") == published.split_sha256("test"):
        return Champion(champion.label, Scorecard.from_card(card, champion.version),
                        _loaded(version_predictions, registry, champion.version))
    top1, predictions = _evaluate_version(registry, champion.version, published,
                                          cache_dir=cache_dir, device=device, workers=workers)
    return Champion(champion.label, Scorecard(top1, published.split_sha256("test"),
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
    from flowerml.evaluation.inference import evaluate_model
    from flowerml.evaluation.predictions import prediction_rows
    from flowerml.registry.release import load_version

    trained = load_version(registry, version, device)
    metrics = evaluate_model(trained, registry.store, published, cache_dir=cache_dir,
                             workers=workers)
    keys = [entry.key for entry in published.split_files("test")]
    rows = prediction_rows(keys, metrics.predictions) if metrics.predictions else []
    return metrics.top1, PredictionSet(
        trained.source, f"{published.dataset}@{published.version}",
        published.split_sha256("test"), "test", trained.weights_sha256, trained.class_names,
        tuple(rows))


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
    from flowerml.data.manifest import resolve_dataset

    published = resolve_dataset(store, dataset, version)
    champion = measure_champion(Registry(store, model), published, alias=alias,
                                cache_dir=cache_dir, device=device)
    candidate = Scorecard(top1, published.split_sha256("test"))
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
                        else scorecard.version, export_parity=export_parity(registry, version),
                        int8_gate=int8_gate(registry, version))
    if champion is not None and champion.version is None:
        first_read = registry.alias(alias)
        if first_read is not None:
            champion = replace(champion, version=first_read.version)

    def decide(current: AliasState | None) -> Verdict:
        deciding = _champion(registry, current, champion)
        return decide_promotion(_paired_against(registry, candidate, version, deciding),
                                deciding, gate, force=force)

    return move_alias(registry, alias, version, decide, why="promote", forced=force)


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
    from flowerml.registry.export_record import read_export

    record = read_export(registry, version)
    return None if record is None else bool(record.get("parity", {}).get("passed"))


def int8_gate(registry: Registry, version: int) -> bool | None:
    """Whether the version's int8 graph passed its gate (None: it has none)."""
    from flowerml.registry.export_record import read_export

    int8 = (read_export(registry, version) or {}).get("int8")
    return None if not int8 else bool(int8["gate"]["passed"])


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
    from flowerml.data.manifest import resolve_dataset

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


# --------------------------------------------------------------------------------------------
# Promoting a student: its own gate, which does not depend on the alias's current model


def promote_student_version(registry: Registry, version: int, *, alias: str,
                            gate: StudentGate, force: bool = False
                            ) -> tuple[bool, list[str], AliasState | None]:
    """`flowerml registry promote` for a student: its own gate (threshold, and at most
    `max_gap` below its teacher), on the two test top-1s its card recorded at release, both
    measured on the card's test manifest; `force` moves the alias regardless (recorded)."""
    card = registry.require_committed(version).card
    if not is_student_card(card):
        raise GateError(f"{registry.model}:{version:06d} was not released as a student")
    manifest = card["test_manifest_sha256"]
    teacher = card["teacher"]
    passes, reasons = decide_student(GateScore(card["metrics"]["top1"], manifest),
                                     GateScore(teacher["test_top1"], manifest), gate,
                                     teacher_label=teacher["label"])
    if not passes and not force:
        return False, reasons, None
    if not passes:
        reasons = [*reasons, "forced past the student gate"]
    return move_alias(registry, alias, version, lambda _current: (True, reasons),
                      why="student gate", forced=force and not passes)


def promote_released_student(registry: Registry, version: int, alias: str,
                             reasons: list[str]) -> bool:
    """Point `alias` at a student `release_student` just released past its gate; False when
    the alias holds a newer version by then (that one stays)."""
    def newer_stays(current: AliasState | None) -> Verdict:
        return current is None or current.version <= version, reasons

    _, _, state = move_alias(registry, alias, version, newer_stays, why="student gate")
    return state is not None and state.version == version
