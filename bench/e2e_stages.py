"""The e2e benchmark's stages: one traced retrain's trace cut into the stages of its wall time.

The CLI's timeline from trigger to exit is cut by what the run waits for at each instant (a
task, the server's start, the option checks, ...), so work done in the background while the
run waits on something else is not counted twice; the training task is cut by the training
child's own spans (its start, setup, sync, decode cache, each epoch's training, validation and
checkpoint, its exit). The table also lists every process's start and the installed
distributions the run imported.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path


def process_of(events: list[dict], word: str) -> int | None:
    """The pid of the first traced process whose command line holds `word`."""
    for event in events:
        if event["name"] == "process.interpreter" and word in event.get("argv", []):
            return event["pid"]
    return None


def spans(events: list[dict], name: str, pid: int | None = None,
          within: tuple[float, float] | None = None) -> list[dict]:
    found = [e for e in events if e["name"] == name and (pid is None or e["pid"] == pid)
             and (within is None or within[0] <= e["start"] and e["end"] <= within[1])]
    return sorted(found, key=lambda e: e["start"])


def first(events: list[dict], name: str, pid: int | None = None,
          within: tuple[float, float] | None = None) -> dict | None:
    found = spans(events, name, pid, within)
    return found[0] if found else None


def length(span: dict | None) -> float:
    return span["end"] - span["start"] if span else 0.0


def total(found: Iterable[dict]) -> float:
    return sum(length(span) for span in found)


def secs(seconds: float) -> float:
    """Seconds as the report gives them: to hundredths."""
    return round(seconds, 2)


TASK_STAGES = {"fetch-sources": "fetch", "publish-split": "publish", "train": "train",
               "evaluate": "test evaluation", "decide-promotion": "decide",
               "register-model": "register", "export-onnx": "export",
               "publish-evaluation": "test evaluation", "promote-model": "promote",
               "prepare-evaluation-split": "test split prepared"}
# Tasks the flow runs beside another it waits for (the test split, while training runs): an
# instant goes to them only where nothing else covers it, i.e. where the flow waits for them.
BACKGROUND_TASKS = frozenset({"prepare-evaluation-split"})


# The order stages are listed (and stacked) in: the run's own order, Prefect's share last.
STAGE_ORDER = ["CLI start", "option checks", "before the flow", "demo archive", "Prefect start",
               "fetch", "publish", "train", "test split prepared", "test evaluation", "decide",
               "register", "export", "promote", "Prefect between tasks", "Prefect stop",
               "summary and exit"]


def training_stages(events: list[dict], task: dict, child: int | None) -> list[dict]:
    """The training task cut into: child start, setup, sync, decode, model, each epoch, exit."""
    inside = (task["start"], task["end"])
    run = first(events, "lib.run_training_child", within=inside)
    fit = first(events, "train.fit", child)
    interpreter = first(events, "process.interpreter", child)
    if not (run and fit and interpreter):
        return [{"stage": "train", "seconds": secs(length(task))}]
    fit_range = (fit["start"], fit["end"])
    epochs = spans(events, "train.epoch_train", child, fit_range)
    model = total(spans(events, "train.model_build", child, fit_range))
    sync = total(spans(events, "data.sync", child, fit_range))
    decode = total(spans(events, "data.decode_cache", child, fit_range))
    loop_start = epochs[0]["start"] if epochs else fit["end"]
    stages = [
        {"stage": "training child start", "seconds": secs(interpreter["end"] - run["start"]),
         "detail": {"python start": secs(length(interpreter)),
                    "before the child": secs(interpreter["start"] - run["start"])}},
        {"stage": "training child imports", "seconds": secs(fit["start"] - interpreter["end"]),
         "detail": {"note": "torch, torchvision, flowerml and the CLI, until fit() starts"}},
        {"stage": "model build", "seconds": secs(model)},
        {"stage": "sync", "seconds": secs(sync)},
        {"stage": "decode cache", "seconds": secs(decode)},
        {"stage": "training setup",
         "seconds": secs(loop_start - fit["start"] - model - sync - decode),
         "detail": {"weights": secs(total(spans(events, "train.resolve_weights", child))),
                    "placement": secs(total(spans(events, "train.start_placement", child))),
                    "dataset manifest": secs(total(spans(events, "train.resolve_dataset",
                                                      child)))}},
    ]
    for index, epoch in enumerate(epochs):
        after = epochs[index + 1]["start"] if index + 1 < len(epochs) else fit["end"]
        between = (epoch["end"], after)
        valid = total(spans(events, "train.epoch_valid", child, between))
        stages.append({"stage": f"epoch {index + 1} train", "seconds": secs(length(epoch)),
                       "epoch": index + 1, "kind": "train"})
        stages.append({"stage": f"epoch {index + 1} valid", "seconds": secs(valid),
                       "epoch": index + 1, "kind": "valid"})
        stages.append({"stage": f"epoch {index + 1} checkpoint",
                       "seconds": secs(after - epoch["end"] - valid), "epoch": index + 1,
                       "kind": "checkpoint",
                       "detail": {"checkpoint": secs(total(spans(events, "train.checkpoint",
                                                              child, between))),
                                  "best weights": secs(total(spans(events, "train.save_best",
                                                                child, between)))}})
    stages.append({"stage": "training child exit", "seconds": secs(run["end"] - fit["end"])})
    stages.append({"stage": "train task (Prefect)", "seconds": secs(length(task) - length(run)),
                   "detail": {"note": "the progress artifact and log lines around the child"}})
    return stages


def task_detail(events: list[dict], stage: str, task: dict, cli: int) -> dict:
    inside = (task["start"], task["end"])

    def part(name: str) -> float:
        return secs(total(spans(events, name, cli, inside)))

    if stage == "test evaluation":
        return {"load model": part("eval.load_model"), "sync": part("data.sync"),
                "decode cache": part("data.decode_cache"), "evaluation loop": part("eval.loop"),
                "report": part("eval.report")}
    if stage == "export":
        return {"onnx export": part("export.onnx_export"), "parity": part("export.parity"),
                "int8 (quantise and gate)": part("export.int8")}
    if stage == "test split prepared":
        return {"note": "synced and decoded at the idle priority beside training; counted "
                        "only where the flow waits for it",
                "whole task": secs(length(task))}
    if stage == "fetch":
        return {"library": part("lib.fetch_sources")}
    if stage == "publish":
        return {"library": part("lib.publish_split")}
    return {}


def attribute(start: float, end: float, labelled: list[tuple[str, float, float]],
              fallback: Callable[[float], str]) -> dict[str, float]:
    """Seconds of [start, end] per label: each instant goes to the first of `labelled` (label,
    from, to) that covers it, else to `fallback(instant)`; labels in order of first use."""
    cuts = sorted({start, end, *(t for _l, a, b in labelled for t in (a, b) if start < t < end)})
    seconds: dict[str, float] = {}
    for a, b in itertools.pairwise(cuts):
        middle = (a + b) / 2
        label = next((name for name, lo, hi in labelled if lo <= middle <= hi), None)
        label = label or fallback(middle)
        seconds[label] = seconds.get(label, 0.0) + (b - a)
    return seconds


def stage_table(run: dict) -> dict:
    """The stages of one traced retrain, in time order, summing to its wall time.

    The CLI's timeline from trigger to exit is cut by what it is waiting for at each instant
    (a task, the demo archive, Prefect's server start, the option checks, ...), so work done
    in the background while the run waits on something else is not counted twice."""
    events, t0, t_exit = run["events"], run["trigger"], run["exit"]
    cli = process_of(events, "retrain")
    child = process_of(events, "--exit-with-parent")
    interpreter = first(events, "process.interpreter", cli)
    checks = [e for e in events if e["pid"] == cli and e["name"].startswith("cli.")
              and e["name"] not in ("cli.run_retrain", "cli.stop_temporary_server",
                                    "cli.print_summary", "cli.demo_source",
                                    "cli.prefect_console")]
    flow = first(events, "prefect.flow", cli)
    run_retrain = first(events, "cli.run_retrain", cli)
    if not (interpreter and checks and flow and run_retrain):
        raise RuntimeError("the trace misses the CLI's main spans: did the command start?")
    checks_start = min(e["start"] for e in checks)
    tasks = sorted((e for e in events if e["pid"] == cli and e["name"].startswith("prefect.task:")),
                   key=lambda e: e["start"])
    server = first(events, "prefect.server_start", cli)

    def task_name(task: dict) -> str:
        return task["name"].removeprefix("prefect.task:")

    labelled = [(TASK_STAGES.get(task_name(t), task_name(t)), t["start"], t["end"])
                for t in sorted(tasks, key=lambda t: task_name(t) in BACKGROUND_TASKS)]
    labelled.append(("CLI start", t0, checks_start))
    labelled += [("option checks", e["start"], e["end"]) for e in checks]
    labelled += [("demo archive", e["start"], e["end"])
                 for e in spans(events, "cli.demo_source", cli)]
    if server:
        labelled.append(("Prefect start", server["start"], server["end"]))
    # Importing Prefect's server module (FastAPI, SQLAlchemy, ...) comes first in its start.
    labelled += [("Prefect start", e["start"], e["end"])
                 for e in spans(events, "import.prefect.server.api.server", cli)]
    labelled += [("Prefect stop", e["start"], e["end"])
                 for e in spans(events, "cli.stop_temporary_server", cli)]

    def fallback(instant: float) -> str:
        if instant < flow["start"]:
            return "before the flow"
        if instant <= flow["end"]:
            return "Prefect between tasks"
        return "Prefect stop" if instant <= run_retrain["end"] else "summary and exit"

    seconds = attribute(t0, t_exit, labelled, fallback)
    uvicorn = first(events, "process.interpreter", process_of(events, "uvicorn"))
    details = {
        "CLI start": {"python start": secs(interpreter["end"] - t0),
                      "imports": secs(checks_start - interpreter["end"])},
        "option checks": {e["name"].removeprefix("cli."): secs(length(e)) for e in checks},
        "before the flow": {"note": "what the run waits for before the flow starts and "
                                    "outside the stages around it"},
        "Prefect start": {
            "note": "the temporary local server (0 with PREFECT_API_URL), as far as the run "
                    "waits for it",
            "whole start": secs(length(server)),
            "importing its module here": secs(total(spans(
                events, "import.prefect.server.api.server", cli))),
            "before its process starts": secs(uvicorn["start"] - server["start"])
            if uvicorn and server else None,
            "its process until healthy": secs(server["end"] - uvicorn["start"])
            if uvicorn and server else None},
        "Prefect between tasks": {"note": "the flow's engine: run records, states, results"},
        "summary and exit": exit_detail(events, cli, run_retrain["end"]),
    }
    stages: list[dict] = []
    order = [*STAGE_ORDER, *(label for label in seconds if label not in STAGE_ORDER)]
    for label in (label for label in order if label in seconds):
        value = seconds[label]
        task = next((t for t in tasks if TASK_STAGES.get(t["name"].removeprefix(
            "prefect.task:")) == label), None)
        if label == "train" and task:
            stages.extend(training_stages(events, task, child))
            continue
        detail = task_detail(events, label, task, cli) if task else details.get(label)
        stages.append({"stage": label, "seconds": secs(value), **({"detail": detail}
                                                                 if detail else {})})
    decision = max((t["end"] for t in tasks if t["name"].endswith(
        (":decide-promotion", ":promote-model"))), default=flow["end"])
    wall = t_exit - t0
    epochs = [s for s in stages if "epoch" in s]
    training = sum(s["seconds"] for s in epochs if s["kind"] in ("train", "valid"))
    return {"wall_seconds": secs(wall), "stages": stages,
            "unaccounted_seconds": secs(wall - sum(s["seconds"] for s in stages)),
            "trigger_to_decision_seconds": secs(decision - t0),
            "epochs": sum(1 for s in epochs if s["kind"] == "train"),
            "epoch_seconds": secs(training),
            "checkpoint_seconds": secs(sum(s["seconds"] for s in epochs
                                        if s["kind"] == "checkpoint")),
            "overhead_seconds": secs(wall - training),
            "processes": process_summary(events, t0),
            "imported_distributions": imported_distributions(events)}


def exit_detail(events: list[dict], cli: int, after: float) -> dict:
    """What the CLI does once the flow is over: the summary, its threads, its exit handlers."""
    late = (after, float("inf"))
    handlers = [e for e in events if e["pid"] == cli and e["name"].startswith("exit.handler:")]
    slowest = sorted(handlers, key=length, reverse=True)[:4]
    return {"print summary": secs(total(spans(events, "cli.print_summary", cli, late))),
            "join threads": secs(total(spans(events, "exit.join_threads", cli, late))),
            "threads joined": sorted({name for e in spans(events, "exit.join_threads", cli, late)
                                      for name in e.get("threads", [])}),
            "exit handlers": secs(total(handlers)),
            "slowest handlers": {e["name"].removeprefix("exit.handler:"): secs(length(e))
                                 for e in slowest}}


def imported_distributions(events: list[dict]) -> list[str]:
    """The installed distributions (name==version) whose modules any traced process imported."""
    import importlib.metadata

    modules = {m for e in events if e["name"] == "process.modules" for m in e["modules"]}
    owners = importlib.metadata.packages_distributions()
    names = {dist for module in modules for dist in owners.get(module, ())}
    found = []
    for name in sorted(names, key=str.lower):
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def process_summary(events: list[dict], t0: float) -> list[dict]:
    """Every traced process: its command, when it started and how long its interpreter took."""
    rows = []
    for event in events:
        if event["name"] == "process.interpreter":
            argv = event.get("argv", [])
            rows.append({"command": " ".join(Path(argv[0]).name if i == 0 else a
                                             for i, a in enumerate(argv[:4])),
                         "started_at": secs(event["start"] - t0),
                         "python_start_seconds": secs(length(event))})
    return rows
