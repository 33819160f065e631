"""The promotion gates, champion and student, and the one way a verdict moves an alias.

- The champion gate (`Gate`, `Scorecard`, `decide_promotion`) is a pure function of two
  scorecards. When the candidate's scorecard carries its image-by-image comparison with the
  champion (`Scorecard.paired`, a `flowerml.registry.comparison.Comparison`), the gate also refuses a
  candidate that McNemar's exact test finds significantly worse, or whose accuracy on some
  class falls more than `Gate.class_drop` below the champion's; without one (a model evaluated
  before evaluations kept per-image predictions) it says so and decides on top-1.
- The student gate (`StudentGate`, `GateScore`, `decide_student`) is a pure function of a
  distilled student's test top-1 and its teacher's, on the same test manifest.
- Both compare scores with the same slack (`EPSILON`), and both move an alias with
  `move_alias`: read the alias, decide against it, move it by compare-and-swap from exactly
  the state decided on, and when another writer moved it in between, read and decide again.

Finding the scores to compare (judging a champion fairly) and promoting past a gate are
`flowerml.registry.promotion`'s; the registry only keeps versions, aliases and their history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowerml.core.errors import TransientError
from flowerml.registry.aliases import AliasMoved, AliasState
from flowerml.registry.comparison import ClassDelta, Comparison
from flowerml.registry.names import RegistryError
from flowerml.registry.versions import Registry

# Scores are ratios like 5911/6149: compare with a hair of slack so that a candidate exactly at
# a bound (the threshold, `tolerance` below the champion, `max_gap` below the teacher) is not
# rejected by float rounding.
EPSILON = 1e-9
SIGNIFICANCE = 0.05
"""McNemar's one-sided p below which a candidate counts as significantly worse."""
FLOOR_NAMES_LIMIT = 5
MAX_DECISIONS = 20
"""How many times `move_alias` decides again after losing the alias to another writer."""

Verdict = tuple[bool, list[str]]
"""A gate's decision: whether it passes, and the reasons in words and numbers."""


class GateError(RegistryError):
    """A gate's bound outside [0, 1], scores measured on different test manifests, or a
    version the gate cannot judge."""


class AliasKeptMoving(TransientError):
    """Other writers moved the alias every time a decision was about to move it."""


def _unit_interval(value: float, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise GateError(f"{option} must be between 0 and 1 (got {value})")
    return float(value)


# --------------------------------------------------------------------------------------------
# The champion gate: pure


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
    int8_gate: bool | None = None
    """Whether the version's int8 graph passed its own gate; None when it has none. A failed
    int8 never blocks promotion (the version serves on fp32): the reasons say so."""

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
                "version": self.version, "export_parity": self.export_parity, "paired": paired,
                "int8_gate": self.int8_gate}

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
                   value.get("export_parity"), found, value.get("int8_gate"))


INT8_FAILED = ("its int8 export failed its gate (see export.json): promoted on fp32, served by "
               "fp32 ONNX on a CPU")


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
    passes = candidate.top1 + EPSILON >= gate.threshold
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
    if candidate.int8_gate is False:
        reasons.append(INT8_FAILED)
    if force:
        return True, [*reasons, "forced: promoted regardless of the gate"]
    return passes, reasons


def _champion_name(champion: Scorecard) -> str:
    return f"production v{champion.version:06d}" if champion.version else "production"


def _compare(candidate: Scorecard, champion: Scorecard, tolerance: float) -> tuple[bool, str]:
    head = f"test top-1 {candidate.top1:.4f} vs {_champion_name(champion)} {champion.top1:.4f}"
    delta = candidate.top1 - champion.top1
    if delta + tolerance + EPSILON >= 0:
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
    below = [c for c in paired.per_class if -c.delta > class_drop + EPSILON]
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
# The student gate: pure


@dataclass(frozen=True)
class StudentGate:
    """A student is promoted when its test top-1 clears `threshold` and is at most `max_gap`
    below its teacher's, both measured on the same test manifest."""

    threshold: float = 0.95
    max_gap: float = 0.01

    def __post_init__(self) -> None:
        _unit_interval(self.threshold, "--threshold")
        _unit_interval(self.max_gap, "--max-gap")


@dataclass(frozen=True)
class GateScore:
    """A test top-1 and the manifest it was measured on."""

    top1: float
    manifest_sha256: str


def decide_student(student: GateScore, teacher: GateScore, gate: StudentGate, *,
                   teacher_label: str = "the teacher") -> Verdict:
    """Whether the student clears its gate, with the reasons in words and numbers. Scores from
    different test manifests are not comparable: GateError."""
    if student.manifest_sha256 != teacher.manifest_sha256:
        raise GateError(f"the student was measured on test manifest "
                        f"{student.manifest_sha256[:12]}... and {teacher_label} on "
                        f"{teacher.manifest_sha256[:12]}...: measure both on the same one")
    floor = student.top1 + EPSILON >= gate.threshold
    reasons = [f"test top-1 {student.top1:.4f} {'>=' if floor else '<'} threshold "
               f"{gate.threshold:.4f}"]
    gap = teacher.top1 - student.top1
    close = gap <= gate.max_gap + EPSILON
    head = f"test top-1 {student.top1:.4f} vs teacher {teacher_label} {teacher.top1:.4f}"
    reasons.append(f"{head}: gap {gap:+.4f} {'within' if close else 'beyond'} max gap "
                   f"{gate.max_gap:.4f}")
    return floor and close, reasons


def is_student_card(card: dict[str, Any]) -> bool:
    """Whether a version was released by `flowerml.distillation.distill.release_student` (its card holds
    the student gate)."""
    return (card.get("gate") or {}).get("kind") == "student" and "teacher" in card


# --------------------------------------------------------------------------------------------
# Moving an alias on a verdict


def move_alias(registry: Registry, alias: str, version: int,
               decide: Callable[[AliasState | None], Verdict], *, why: str,
               forced: bool = False) -> tuple[bool, list[str], AliasState | None]:
    """Move `alias` to `version` when `decide`, asked about the alias as it is, lets it.

    The alias is read, `decide(current)` gives the verdict, and the move is a compare-and-swap
    from exactly that state (`Registry.set_alias(expect_seq=...)`, an IfMatch on the alias's
    etag underneath). When another writer moved the alias in between, it is read again and
    `decide` asked again: a verdict holds only for the state it was made on (at most
    MAX_DECISIONS times, then AliasKeptMoving). An alias already at `version` is not moved.
    The move's recorded reason is `why: <reasons>`. Returns (passes, reasons, the alias after
    the move, or None when the verdict refused).
    """
    current = registry.alias(alias)
    for _ in range(MAX_DECISIONS):
        passes, reasons = decide(current)
        if not passes:
            return False, reasons, None
        if current is not None and current.version == version:
            return True, [*reasons, f"v{version:06d} is already {alias}: nothing to move"], \
                current
        try:
            state = registry.set_alias(alias, version, reason=f"{why}: " + "; ".join(reasons),
                                       forced=forced, expect_seq=current.seq if current else 0)
            return True, reasons, state
        except AliasMoved as moved:
            current = moved.current
    raise AliasKeptMoving(f"alias {alias} of {registry.model} moved {MAX_DECISIONS} times "
                          f"while deciding whether to move it to v{version:06d}; try again")
