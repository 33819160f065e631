"""`flowerml registry ...`: versions, aliases, promotion, rollback and history."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click
from click.core import ParameterSource

from flowerml.cli.app import (
    CliError,
    alias_option,
    cli,
    device_option,
    emit_json,
    json_option,
    store_option,
)
from flowerml.cli.tracking import mirror_registry
from flowerml.registry.gates import Gate
from flowerml.registry.names import DEFAULT_ALIAS
from flowerml.settings import build_store, load_settings


def gate_options(purpose: str) -> Callable[[Callable], Callable]:
    """The champion gate's figures as options (`--threshold`, `--tolerance`, `--class-drop`);
    `purpose` ends each help line (what the gate's verdict is for)."""
    figures = [
        ("--threshold", Gate.threshold, "Minimum test top-1"),
        ("--tolerance", Gate.tolerance, "Allowed drop below the alias's current model"),
        ("--class-drop", Gate.class_drop, "Largest drop of any one class's test accuracy below "
         "the alias's current model (needs both models' stored per-image predictions)"),
    ]

    def add(command: Callable) -> Callable:
        for flag, default, text in reversed(figures):
            command = click.option(flag, type=float, default=default, show_default=True,
                                   help=f"{text}{purpose}.")(command)
        return command
    return add


@cli.group()
def registry() -> None:
    """The model registry: versions, aliases, promotion, rollback."""


def open_registry(name: str, store: str | None):
    from flowerml.registry.versions import Registry

    settings = load_settings(store=store)
    return Registry(build_store(settings), name), settings


def require_model(entry) -> None:
    """An unknown model is one line and exit 2 in every registry command that names one."""
    if not entry.has_versions():
        raise CliError(f"model '{entry.model}' has no versions on {entry.store.uri}",
                       "not-found")


class VersionNumber(click.ParamType):
    """A registry version: a positive whole number (`-1` reaches here as a value, not as an
    unknown option: its command ignores unknown options)."""

    name = "version"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise CliError(f"VERSION must be a positive number (1, 2, ...): got {value!r}")
        return int(text)


def version_text(version: int | None) -> str:
    return "-" if version is None else f"{version:06d}"


@registry.command("list")
@store_option
@json_option
def registry_list(store: str | None, as_json: bool) -> None:
    """Every registered model, with its version count and production version.

    A store with no models prints nothing on stdout (`[]` with --json), a line naming the
    store on stderr, and exits 0.
    """
    from flowerml.registry.versions import Registry, list_models

    target = build_store(load_settings(store=store))
    rows = []
    for name in list_models(target):
        entry = Registry(target, name)
        production = entry.alias(DEFAULT_ALIAS)
        rows.append({"model": name, "versions": len(entry.versions()),
                     "production": production.version if production else None})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no models on {target.uri}", err=True)
    for row in rows:
        click.echo(f"{row['model']}: {row['versions']} version(s), production "
                   f"{version_text(row['production'])}")


@registry.command("show")
@click.argument("name")
@store_option
@json_option
def registry_show(name: str, store: str | None, as_json: bool) -> None:
    """A model's versions (metrics, run, committed, the gate's paired test against the model
    it was judged against) and aliases.

    An unknown model is an error (exit 2), with or without --json.
    """
    entry, _ = open_registry(name, store)
    versions = [{"version": v.version, "committed": v.committed,
                 "top1": v.card.get("metrics", {}).get("top1"),
                 "run_id": v.card.get("lineage", {}).get("run_id"),
                 "dataset_version": v.card.get("lineage", {}).get("dataset_version"),
                 "paired": (v.card.get("gate") or {}).get("paired")}
                for v in entry.versions()]
    if not versions:
        raise CliError(f"model '{name}' has no versions on {entry.store.uri}", "not-found")
    aliases = {name: state.version for name, state in entry.aliases().items()}
    if as_json:
        emit_json({"model": name, "versions": versions, "aliases": aliases})
        return
    for row in versions:
        tags = [a for a, v in aliases.items() if v == row["version"]]
        top1 = f"{row['top1']:.4f}" if isinstance(row["top1"], float) else "-"
        state = "" if row["committed"] else " (not committed)"
        click.echo(f"{row['version']:06d}{state}: top-1 {top1}, run {row['run_id']}"
                   + (f"  [{', '.join(tags)}]" if tags else ""))
        for line in paired_lines(row["paired"]):
            click.echo(f"    {line}")


def paired_lines(paired: dict | None) -> list[str]:
    """The gate's paired test as the card records it, in words (nothing for no champion)."""
    if not isinstance(paired, dict):
        return []
    if not paired.get("ran"):
        return [f"vs {paired.get('champion')}: paired test not run ({paired.get('reason')})"]
    verdict = "significantly worse" if paired["significantly_worse"] else \
        "not significantly worse"
    lines = [f"vs {paired['champion']}: McNemar {paired['candidate_only']} right only here, "
             f"{paired['champion_only']} right only there (of {paired['n']}), one-sided p = "
             f"{paired['p_worse']:.4g}: {verdict}"]
    below = paired.get("classes_below_floor") or []
    if below:
        lines.append(f"classes more than {paired['class_drop']:.2f} below it: " + ", ".join(
            f"{c['label']} {c['name']} {c['champion']:.4f} -> {c['candidate']:.4f}"
            for c in below))
    else:
        lines.append(f"no class more than {paired['class_drop']:.2f} below it")
    return lines


def move_result(name: str, alias: str, version: int | None, previous: int | None,
                promoted: bool, reasons: list[str], as_json: bool) -> None:
    """What `registry promote` and `registry rollback` print."""
    if as_json:
        emit_json({"model": name, "alias": alias, "version": version, "previous": previous,
                   "promoted": promoted, "reasons": reasons})
        return
    click.echo(f"{'promoted' if promoted else 'not promoted'}: {name}:{version_text(version)}"
               f" -> {alias}")
    for reason in reasons:
        click.echo(f"  - {reason}")


@registry.command("promote", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("version", type=VersionNumber())
@alias_option
@gate_options(purpose="")
@click.option("--max-gap", type=float, default=None,
              help="For a student version (released by `flowerml distill`): how far below its "
                   "teacher's test top-1 it may score.  [default: 0.01]")
@click.option("--force", is_flag=True, help="Promote regardless of the gate (recorded).")
@store_option
@device_option
@json_option
def registry_promote(name: str, version: int, alias: str, threshold: float, tolerance: float,
                     class_drop: float, max_gap: float | None, force: bool, store: str | None,
                     device: str, as_json: bool) -> None:
    """Move ALIAS to VERSION if it clears the gate against the current alias.

    The gate: test top-1 at least --threshold and at most --tolerance below the current
    model's; and, when both versions were registered with per-image predictions, McNemar's
    exact test must not find VERSION significantly worse (one-sided p < 0.05) and no class
    may fall more than --class-drop below the current model's accuracy on it. A student
    version (released by `flowerml distill`) has its own gate instead: test top-1 at least
    --threshold and at most --max-gap below its teacher's, as its card recorded both on one
    test manifest. Exits 0 when promoted, 1 when the gate refuses (nothing moves), 2 on bad
    input. --json prints {model, alias, version, previous, promoted, reasons}; `previous` is
    the version the alias pointed at before (null if unset).
    """
    from flowerml.registry.gates import is_student_card

    entry, settings = open_registry(name, store)
    require_model(entry)
    before = entry.alias(alias)
    if is_student_card(entry.require_committed(version).card):
        promoted, reasons, state = promote_student(entry, version, alias, threshold, max_gap,
                                                   force)
    else:
        from flowerml.registry.gates import Gate
        from flowerml.registry.promotion import promote_version

        if max_gap is not None:
            raise CliError(f"--max-gap is for student versions; {name}:{version:06d} is not "
                           "one (its gate is --tolerance and --class-drop)")
        gate = Gate(threshold=threshold, tolerance=tolerance, class_drop=class_drop)
        promoted, reasons, state = promote_version(entry, version, alias=alias, gate=gate,
                                                   force=force, cache_dir=settings.cache_dir,
                                                   device=device)
    if state is not None and state.version == version and (before is None
                                                          or before.version != version):
        previous = state.previous  # moved: the version it replaced
    else:
        now = entry.alias(alias) if state is None else state
        previous = now.version if now else None  # nothing moved: where the alias is
    if promoted:
        mirror_registry(settings, entry.store, name)
    move_result(name, alias, version, previous, promoted, reasons, as_json)
    if not promoted:
        sys.exit(1)


def promote_student(entry, version: int, alias: str, threshold: float,
                    max_gap: float | None, force: bool):
    """The student gate for `registry promote`; the champion gate's options do not apply."""
    from flowerml.registry.gates import StudentGate
    from flowerml.registry.promotion import promote_student_version

    context = click.get_current_context()
    given = [f"--{option.replace('_', '-')}" for option in ("tolerance", "class_drop")
             if context.get_parameter_source(option) is not ParameterSource.DEFAULT]
    if given:
        raise CliError(f"{entry.model}:{version:06d} is a student: its gate is --threshold "
                       f"and --max-gap, not {' and '.join(given)}")
    gate = StudentGate(threshold=threshold, max_gap=0.01 if max_gap is None else max_gap)
    return promote_student_version(entry, version, alias=alias, gate=gate, force=force)


@registry.command("rollback")
@click.argument("name")
@alias_option
@store_option
@json_option
def registry_rollback(name: str, alias: str, store: str | None, as_json: bool) -> None:
    """Point ALIAS back at the version promoted before the current one.

    Each rollback steps one further back along the alias's promotions, skipping versions
    that were rolled away from (a second rollback never returns to the first one's version);
    with nothing earlier it is refused (exit 2). Recorded in the history as a rollback.
    --json prints {model, alias, version, previous, promoted, reasons}.
    """
    entry, settings = open_registry(name, store)
    require_model(entry)
    state = entry.rollback(alias)
    mirror_registry(settings, entry.store, name)
    reason = (f"rolled back from {version_text(state.previous)} to the version promoted "
              "before it")
    if as_json:
        move_result(name, alias, state.version, state.previous, True, [reason], True)
        return
    click.echo(f"{name}@{alias} -> {state.version:06d} (was {version_text(state.previous)})")


@registry.command("history")
@click.argument("name")
@alias_option
@store_option
@json_option
def registry_history(name: str, alias: str, store: str | None, as_json: bool) -> None:
    """Every move of ALIAS, oldest first (versions zero-padded, '-' for unset).

    An unknown model or an alias that was never set is an error (exit 2), with or without
    --json.
    """
    from flowerml.registry.aliases import is_rollback

    entry, _ = open_registry(name, store)
    require_model(entry)
    rows = entry.history(alias)
    if not rows:
        raise CliError(f"{name} has no alias '{alias}' on {entry.store.uri}", "not-found")
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        tags = (" (forced)" if row.get("forced") else "") + (" (rollback)" if is_rollback(row)
                                                             else "")
        click.echo(f"{row['seq']:>4} {row['time']} {version_text(row['from'])} -> "
                   f"{version_text(row['to'])}{tags}: {row['reason']}")


@registry.command("register")
@click.option("--run", "run_id", required=True,
              help="The training run to register: trained with `flowerml train` and evaluated "
                   "on test with `flowerml evaluate`.")
@click.option("--model", "name", default="flowers102", show_default=True,
              help="The registry model to add a version to.")
@alias_option
@gate_options(purpose=" for the gate's verdict recorded on the card")
@store_option
@device_option
@json_option
def registry_register(run_id: str, name: str, alias: str, threshold: float, tolerance: float,
                      class_drop: float, store: str | None, device: str,
                      as_json: bool) -> None:
    """Register a run's best weights as a new version of the model, with the card and lineage
    the retrain flow gives its runs (the gate's verdict against ALIAS included); nothing is
    promoted: `flowerml registry promote` does that.

    The run must have finished training and have a test evaluation of its current weights on
    the dataset version it trained on: otherwise it is refused (exit 2) with the command to run
    first (`flowerml evaluate --run ID`). A run whose weights are already a version is refused
    too. --json prints {model, version, label, location, run_id, weights_sha256, metrics,
    gate}.
    """
    from flowerml.registry.gates import paired_figures
    from flowerml.registry.inventory import location, registrable_run
    from flowerml.registry.promotion import judge_candidate
    from flowerml.registry.release import build_card, register_run
    from flowerml.registry.versions import Registry

    gate = Gate(threshold=threshold, tolerance=tolerance, class_drop=class_drop)
    settings = load_settings(store=store)
    target = build_store(settings)
    evaluation = registrable_run(target, name, run_id)
    dataset, _, version = (evaluation.dataset or "").partition("@")
    promote, reasons, candidate, _ = judge_candidate(
        target, name, alias, evaluation.metrics["top1"], dataset, version, gate, force=False,
        cache_dir=settings.cache_dir, device=device, run_id=run_id)
    card = build_card(target, run_id, evaluation.metrics, promote=promote, reasons=reasons,
                      gate={"threshold": threshold, "tolerance": tolerance,
                            "class_drop": class_drop, "force": False,
                            "paired": paired_figures(candidate.paired, gate)})
    registered = register_run(Registry(target, name), target, run_id, card)
    mirror_registry(settings, target, name)
    where = location(target, f"registry/{name}/versions/{registered.version:06d}/")
    if as_json:
        emit_json({"model": name, "version": registered.version, "label": registered.label,
                   "location": where, "run_id": run_id,
                   "weights_sha256": registered.weights_sha256, "metrics": evaluation.metrics,
                   "gate": {"alias": alias, "promote": promote, "reasons": reasons}})
        return
    click.echo(f"registered {name}:{registered.version:06d} from run {run_id} "
               f"(test top-1 {evaluation.metrics['top1']:.4f}) at {where}")
    verdict = "would promote it" if promote else "would not promote it"
    click.echo(f"the gate {verdict} to {alias}:")
    for reason in reasons:
        click.echo(f"  - {reason}")
    click.echo(f"next: flowerml registry promote {name} {registered.version}"
               + (f" --alias {alias}" if alias != DEFAULT_ALIAS else ""))


@registry.command("sync-mlflow")
@click.argument("name")
@store_option
@json_option
def registry_sync_mlflow(name: str, store: str | None, as_json: bool) -> None:
    """Bring MLflow's registered model NAME level with ours: a model version for each of our
    versions it lacks (weights, card and ONNX export as artifacts), and every alias at the
    version ours points at. Needs FLOWERML_MLFLOW_URI (or MLFLOW_TRACKING_URI); idempotent.
    --json prints {model, created, onnx_added, aliases}."""
    from flowerml.registry.mlflow_sync import sync_model
    from flowerml.tracking.server import TrackingServer

    entry, settings = open_registry(name, store)
    require_model(entry)
    uri = settings.tracking_uri()
    if uri is None:
        raise CliError("no MLflow server to sync with: set FLOWERML_MLFLOW_URI (or "
                       "MLFLOW_TRACKING_URI)")
    server = TrackingServer(uri)
    server.check_reachable()
    result = sync_model(server, entry.store, name)
    if as_json:
        emit_json({"model": name, "created": result.created, "onnx_added": result.onnx_added,
                   "aliases": result.aliases})
        return
    created = ", ".join(f"{ours:06d} as MLflow version {theirs}"
                        for ours, theirs in result.created.items()) or "no new version"
    aliases = ", ".join(f"{alias} -> {version:06d}"
                        for alias, version in result.aliases.items()) or "no alias"
    click.echo(f"MLflow model {name} at {server.shown}: {created}; {aliases}")
