"""Benchmark: where the wall time of a retrain goes, trigger to decision, stage by stage.

What it measures. One `flowerml retrain` (the console script `make demo` runs: the CLI, Prefect
with a temporary local server, the training child, evaluation, the gate, registration, the ONNX
export) on a synthetic archive in the official format, from the moment the command is started
to its exit, cut into stages:

    CLI start (interpreter + imports), option checks, Prefect start (its temporary server),
    fetch, publish, training-child start (interpreter + imports), model build, split sync,
    decode cache, each epoch's training, validation and checkpoint, test evaluation, decide,
    register, export (ONNX and its parity check), promote, Prefect's own time between the
    tasks, Prefect's stop, the summary and the process's exit.

The trigger-to-decision time ends when the gate's last task (promote, else decide) ends; the
overhead is the wall time less the epochs' training and validation (checkpoints count as
overhead). The JSON also lists every process's start (and its interpreter's start-up) and the
installed distributions the run imported (what a machine needs to run it).

How. Nothing in flowerml is changed to be measured: every process the command starts (the CLI,
Prefect's server, the training child) loads the tracer (bench/e2e_tracer.py) through a
generated `sitecustomize`; it wraps a few library functions (`fit`'s steps, `sync_split`,
`build_decoded_split`, `train_epoch`, `evaluate_loader`, the Prefect task calls, the temporary
server's start, ...) so that each call appends one line {pid, name, start, end} to a trace
file. A process's start is its kernel start time (/proc), so interpreter start-up and imports
are measured too; exit handlers and the joining of threads at exit are timed as well. The
stages are read off the trace afterwards (bench/e2e_stages.py): the CLI's timeline from
trigger to exit is cut by what the run waits for at each instant (a task, the server's start,
the checks, ...), so work done in the background while the run waits on something else is not
counted twice; the training task is cut by the training child's own spans. This file holds the
cases and the command; the archive (e2e_archive), the traced processes (e2e_command), the
tutorial's pipeline (e2e_tutorial) and the chart (e2e_chart) have their own modules.

Cases (`--case`):
- `cpu` (default): ResNet-18 at 112 px, 2 epochs, the default recipe's optimiser and
  augmentation, `--weights none` (no ImageNet download offline), gate threshold 0 so the
  promotion path runs too; and, in the same run, the original tutorial's pipeline on the same
  data and model (its split script re-saving every JPEG, ImageFolder with its PIL transforms,
  fp32, Adam, batch 48, num_workers 0): one epoch of train + valid and part of the test split
  timed, its full run (40 epochs) extrapolated, and also at flowerml's epoch count. With
  `--repeat N`, N such pairs alternate (this machine's speed drifts by 10-20% within the hour)
  and the pair with the median ratio is the one reported in full; `pairs` lists them all.
- `gpu`: the default recipe (ResNet-152, 224 px, its full schedule) on CUDA, and the
  tutorial's pipeline with the same model at 224 px.
- `demo`: `flowerml retrain --preset demo` as `make demo` runs it (a fresh working folder,
  so its synthetic archive is drawn, ingested, synced and decoded); with `--baseline REF` the
  same command from the code of git commit REF (with `--baseline-paths`, only those files
  from REF and the rest from the working tree), the candidate first, then the baseline,
  `--repeat` times, alternating, to measure a cut against its baseline in one run. Its
  figure: the overhead (target: at most 45 s), with each stage's median.

The archive. `--scale 1` is the real archive's size: 102 classes, 8,189 JPEGs with a long side
of 500 px (~40 KB each), the official split sizes 1,020 / 1,020 / 6,149 (every class in every
split). `--scale s` keeps the 102 classes and multiplies every split by s (at least one image
per class and split). The archive is drawn once per (scale, size, quality) with flowerml's own
flower generator, on all cores, and cached in the work folder; its drawing is not timed.
Every retrain starts from a fresh store and cache (a cold run: everything is uploaded, synced
and decoded); Prefect's database under the work folder is created once, untimed, before the
first timed run, as a user's first `make demo` would otherwise pay once.

Prints exactly one JSON object on stdout (also written to `--out`); `--chart` draws the stages
as a stacked bar chart (matplotlib). Progress goes to stderr.

    python bench/e2e.py --scale 0.25                         # the CPU case, a quarter scale
    python bench/e2e.py --scale 1 --repeat 3                 # 3 alternating pairs, the median
    python bench/e2e.py --case demo --baseline HEAD~1 --baseline-paths flows/cli.py --repeat 2
    python bench/e2e.py --case gpu --out gpu-e2e.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, load_average, machine_facts, progress_log
from e2e_archive import JPEG_QUALITY, JPEG_SIZE, prepare_archive
from e2e_chart import chart_bars, chart_title, draw_chart
from e2e_command import console_script, run_traced, warm_prefect_database
from e2e_stages import secs, stage_table
from e2e_tutorial import TUTORIAL_EPOCHS, run_tutorial, tutorial_child

DEMO_OVERHEAD_TARGET_S = 45.0

log = progress_log("bench-e2e")

CASES = {
    "cpu": {"arch": "resnet18", "image_size": 112, "epochs": 2, "device": "cpu"},
    "gpu": {"arch": "resnet152", "image_size": 224, "epochs": None, "device": "cuda"},
}


def retrain_command(case: str, archive: Path | None, args: argparse.Namespace) -> list[str]:
    """The `flowerml retrain` command line of a case."""
    if case == "demo":
        extra = ["--epochs", str(args.epochs)] if args.epochs else []
        return [*console_script(), "retrain", "--preset", "demo", *extra]
    setup = CASES[case]
    command = [*console_script(), "retrain", "--source", str(archive), "--recipe", "default",
               "--arch", setup["arch"], "--image-size", str(setup["image_size"]),
               "--weights", "none", "--device", setup["device"], "--threshold", "0", "--json"]
    epochs = args.epochs or setup["epochs"]
    if epochs:
        command += ["--epochs", str(epochs)]
    return command


def one_retrain(case: str, label: str, code_root: Path, archive: Path | None, workdir: Path,
                args: argparse.Namespace) -> dict:
    """One cold, traced retrain in a fresh folder (fresh store and cache); its stage table."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    folder = Path(tempfile.mkdtemp(prefix=f"{case}-{slug}-", dir=workdir))
    command = retrain_command(case, archive, args)
    log(f"{label}: {' '.join(command[1:])} (in {folder})")
    load_before = load_average()
    run = run_traced(command, cwd=folder, code_root=code_root, timeout=args.timeout,
                     env={"PREFECT_HOME": str(workdir / "prefect-home")})
    if run["returncode"] not in (0, 1):
        tail = "\n".join(run["stderr"].splitlines()[-15:])
        raise SystemExit(f"{label} failed with exit code {run['returncode']}:\n{tail}")
    table = stage_table(run)
    table.update({"label": label, "code": str(code_root), "returncode": run["returncode"],
                  "loadavg_before": load_before, "loadavg_after": load_average()})
    summary = run["stdout"].strip().splitlines()
    if case != "demo" and summary:
        outcome = json.loads(summary[-1])
        table["outcome"] = {"promoted": outcome.get("promoted"),
                            "test_top1": outcome.get("metrics", {}).get("top1"),
                            "test_images": outcome.get("metrics", {}).get("n")}
    log(f"{label}: {table['wall_seconds']:.1f} s in all, epochs {table['epoch_seconds']:.1f} s,"
        f" overhead {table['overhead_seconds']:.1f} s")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return table


CODE_FOLDERS = ("flowerml", "tasks", "flows")


def baseline_code(workdir: Path, ref: str, paths: list[str]) -> Path:
    """The code to compare against, in a fresh folder: the files of git commit `ref`
    (flowerml, tasks, flows); with `paths`, today's working tree with only those files as
    they were at `ref` (so that other changes in the tree are in both runs)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"code-{commit[:12]}-", dir=workdir))
    if paths:
        for folder in CODE_FOLDERS:
            shutil.copytree(REPO / folder, target / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit,
                              *(paths or CODE_FOLDERS)], stdout=subprocess.PIPE,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def demo_case(workdir: Path, args: argparse.Namespace) -> dict:
    """`make demo`'s command, `--repeat` times per code version (the candidate, then the
    baseline), with each version's medians and the overhead target."""
    codes = [("candidate", REPO)]
    if args.baseline:
        codes.append((f"baseline {args.baseline}",
                      baseline_code(workdir, args.baseline, args.baseline_paths)))
    runs: list[dict] = []
    for repeat in range(args.repeat):
        for label, root in codes:
            runs.append(one_retrain("demo", label, root, None, workdir, args) | {"repeat": repeat})
    result: dict = {"runs": runs, "medians": {}}
    for label, _root in codes:
        mine = [run for run in runs if run["label"] == label]
        result["medians"][label] = {
            key: secs(statistics.median([run[key] for run in mine]))
            for key in ("wall_seconds", "epoch_seconds", "overhead_seconds")}
        result["medians"][label]["stages"] = median_stages(mine)
    candidate = result["medians"]["candidate"]["overhead_seconds"]
    result["target"] = {"overhead_at_most_s": DEMO_OVERHEAD_TARGET_S,
                        "met": candidate <= DEMO_OVERHEAD_TARGET_S}
    if args.baseline:
        base = result["medians"][f"baseline {args.baseline}"]["overhead_seconds"]
        result["overhead_cut_seconds"] = secs(base - candidate)
    return result


def median_stages(runs: list[dict]) -> list[dict]:
    """Each stage's median seconds over runs (stages in the first run's order)."""
    names = [s["stage"] for s in runs[0]["stages"]]
    return [{"stage": name,
             "seconds": secs(statistics.median([stage_seconds(run, name) for run in runs]))}
            for name in names]


def stage_seconds(run: dict, name: str) -> float:
    """The seconds of the stage `name` in one run (0 where the run has no such stage)."""
    return next((s["seconds"] for s in run["stages"] if s["stage"] == name), 0.0)


def training_case(case: str, workdir: Path, args: argparse.Namespace) -> dict:
    """A retrain of the case on the archive at `--scale`, and the tutorial's pipeline on it;
    with `--repeat N`, N such pairs, alternating, so that the machine's drift over the run
    falls on both sides: the pair whose ratio is the median is reported in full, every pair's
    figures beside it."""
    archive, facts = prepare_archive(workdir, args.scale, args.jpeg_size, args.jpeg_quality)
    setup = CASES[case]
    epochs = args.epochs or setup["epochs"] or 30
    pairs = []
    for _repeat in range(args.repeat if args.tutorial else 1):
        flowerml = one_retrain(case, "flowerml", REPO, archive, workdir, args)
        tutorial = tutorial_run(archive, workdir, setup, args, epochs) if args.tutorial else None
        pairs.append((flowerml, tutorial))
    result: dict = {"archive": facts, "setup": {**setup, "epochs": epochs, "recipe": "default",
                                                 "weights": "none"}}
    if not args.tutorial:
        return result | {"flowerml": pairs[0][0]}
    ratios = [same_epochs(tutorial) / flowerml["wall_seconds"] for flowerml, tutorial in pairs]
    middle = sorted(range(len(pairs)), key=ratios.__getitem__)[len(pairs) // 2]
    flowerml, tutorial = pairs[middle]
    full = tutorial["extrapolated_full_run"]["seconds"]
    result |= {"flowerml": flowerml, "tutorial": tutorial,
               "speedup": {"vs_tutorial_full_run": secs(full / flowerml["wall_seconds"]),
                           "vs_tutorial_same_epochs": secs(ratios[middle])}}
    if len(pairs) > 1:
        result["pairs"] = [{"flowerml_seconds": f["wall_seconds"],
                            "tutorial_same_epochs_seconds": secs(same_epochs(t)),
                            "vs_tutorial_same_epochs": secs(ratio)}
                           for (f, t), ratio in zip(pairs, ratios, strict=True)]
        result["reported_pair"] = middle
    return result


def tutorial_run(archive: Path, workdir: Path, setup: dict, args: argparse.Namespace,
                 epochs: int) -> dict:
    """The tutorial's pipeline on the archive, in a scratch folder."""
    scratch = Path(tempfile.mkdtemp(prefix="tutorial-", dir=workdir))
    try:
        return run_tutorial(archive, scratch, arch=setup["arch"],
                            image_size=setup["image_size"], device=setup["device"],
                            test_images=args.tutorial_test_images, epochs_full=TUTORIAL_EPOCHS,
                            epochs_same=epochs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def same_epochs(tutorial: dict) -> float:
    return tutorial["extrapolated_same_epochs"]["seconds"]


def machine() -> dict:
    facts = {**machine_facts(), "cpu_count": os.cpu_count()}
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("cpu", "gpu", "demo"), default="cpu")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="archive size as a fraction of the real one (1: 8,189 images)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (cpu: 2; gpu: the default recipe's 30)")
    parser.add_argument("--jpeg-size", type=int, default=JPEG_SIZE)
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY)
    parser.add_argument("--no-tutorial", dest="tutorial", action="store_false",
                        help="skip the tutorial's pipeline")
    parser.add_argument("--tutorial-test-images", type=int, default=960,
                        help="test images the tutorial's evaluation is timed on (the rest "
                             "extrapolated)")
    parser.add_argument("--baseline", default=None,
                        help="demo: also run the command from this git commit's code")
    parser.add_argument("--baseline-paths", nargs="*", default=[],
                        help="demo: take only these files from --baseline, the rest from the "
                             "working tree")
    parser.add_argument("--repeat", type=int, default=1,
                        help="demo: runs per code version; cpu/gpu: flowerml-tutorial pairs")
    parser.add_argument("--timeout", type=float, default=3 * 3600,
                        help="seconds before a retrain is stopped")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flowerml-e2e"),
                        help="where the archive, Prefect's database and the runs live")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--chart", default=None, help="draw the stacked bar chart (PNG) here")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--tutorial-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tutorial_child:
        print(json.dumps(tutorial_child(json.loads(args.tutorial_child))), flush=True)
        return
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    warm_prefect_database(workdir / "prefect-home")
    load_before = load_average()
    started = time.time()
    if args.case == "demo":
        result = demo_case(workdir, args)
    else:
        result = training_case(args.case, workdir, args)
    report = {"case": args.case, "scale": args.scale if args.case != "demo" else None,
              **result, "bench_seconds": secs(time.time() - started),
              "loadavg_start": load_before, "loadavg_end": load_average(), "machine": machine(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.chart:
        title = chart_title(args, report)
        draw_chart(chart_bars(args.case, result), title, Path(args.chart))
    print(text)


if __name__ == "__main__":
    main()
