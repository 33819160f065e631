"""Benchmark: what distillation buys a small student, and what the student saves, in one run.

What it measures. On synthetic Flowers-like data (`flowerml.data.synthetic`, published with
`flowerml.data.ingest`) and random initial weights (`--weights none`: nothing pretrained, so the only
knowledge a student can get beyond the labels is the teacher's):

- teacher: a ResNet-50 trained with `flowerml.training.fit.fit` for `--teacher-epochs`;
- plain: a ResNet-18 trained on the labels alone (`fit`);
- distilled: the same ResNet-18, the same epochs, batch, optimiser, schedule, augmentation and
  seed, trained with `flowerml.distillation.distill.distill` on the teacher's outputs (loss
  `alpha * T^2 * KL + (1 - alpha) * CE`, the teacher seeing the same augmented images);

then, for each student, test top-1 and top-1 agreement with the teacher on the test split
(`flowerml.distillation.agreement.compare_on_split`, the same code `flowerml evaluate` uses), over `--seeds`
seeds (mean and each seed's figure), and both architectures' parameters, MACs per image and CPU
images/s (`flowerml.distillation.model_cost.model_profile`: batch 8, fp32, torch's threads) at the training
size and at 224 px. Every figure comes from this one run on this machine.

Kept small (6 classes, 48 train images at 32 px, batch 8; teacher 20 epochs, students 6) so it
runs in minutes on 2 cores: a few on quiet ones, several times longer on busy ones. Without
pretrained weights a ResNet-50 needs far more steps than a ResNet-18 to learn this little data:
with half the teacher epochs it ends below the plain student, and a student taught by a teacher
worse than itself gets worse (measured: alpha 0.9, teacher 10 epochs, test top-1 0.33
distilled vs 0.57 plain). Hence 20 teacher epochs, and alpha 0.5 (the labels keep half the
weight; `flowerml distill` defaults to 0.9, meant for a strong pretrained teacher).

Prints exactly one JSON object on stdout; progress goes to stderr.

    python bench/distill.py                      # the default run
    python bench/distill.py --seeds 1 --teacher-epochs 4 --student-epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATASET, progress_log, publish_synthetic

log = progress_log("bench-distill")


def publish(workdir: Path, args: argparse.Namespace):
    """The synthetic dataset of `args`, published into a LocalStore in `workdir`."""
    from flowerml.data.synthetic import SyntheticSpec

    return publish_synthetic(workdir, SyntheticSpec(
        classes=args.classes, per_class=args.per_class, image_size=args.source_size, seed=0),
        concurrency=8)


def config(arch: str, epochs: int, seed: int, args: argparse.Namespace):
    from flowerml.core.recipes import build_config

    return build_config("demo", arch=arch, weights="none", epochs=epochs, seed=seed,
                        image_size=args.image_size, batch_size=args.batch_size,
                        warmup_epochs=min(1.0, epochs), patience=0)


def train(store, cache: Path, run_id: str, train_config, task=None) -> dict[str, Any]:
    from flowerml.training.fit import fit

    started = time.perf_counter()
    result = fit(train_config, store=store, dataset=DATASET, run_id=run_id, cache_dir=cache,
                 device="cpu", workers=0, task=task)
    log(f"{run_id}: best valid top-1 {result.best_valid_top1:.4f} "
        f"({time.perf_counter() - started:.0f} s)")
    return {"best_valid_top1": result.best_valid_top1, "train_seconds": result.seconds}


def judge(store, cache: Path, run_id: str, teacher) -> dict[str, float]:
    """The student's test top-1, and its agreement with the teacher on test."""
    from flowerml.distillation.agreement import compare_on_split
    from flowerml.evaluation.inference import load_trained_model

    student = load_trained_model(store, run_id, "cpu")
    measured = compare_on_split(store, run_id, student, teacher, cache_dir=cache, workers=0)
    return {"test_top1": measured.student_top1, "agreement_test": measured.agreement,
            "teacher_test_top1": measured.teacher_top1}


def profile(trained, file_bytes: int, seconds: float) -> dict[str, Any]:
    """model_profile at the training size and at 224 px (the size Flowers-102 runs at)."""
    from dataclasses import replace

    from flowerml.distillation.model_cost import model_profile

    small = model_profile(trained, file_bytes, seconds=seconds)
    full = model_profile(replace(trained, image_size=224), file_bytes, seconds=seconds)
    return {**small, "macs_224": full["macs"],
            "cpu_images_per_second_224": full["cpu_images_per_second"]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("test_top1", "agreement_test", "best_valid_top1", "train_seconds")
    return {**{f"mean_{key}": round(statistics.fmean(r[key] for r in runs), 4) for key in keys},
            "per_seed": runs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flowerml.core.recipes import DistillConfig
    from flowerml.distillation.distillation_task import DistillationTask
    from flowerml.distillation.teacher import load_teacher
    from flowerml.training.runs import BEST, RunFiles

    torch.set_num_threads(args.threads or torch.get_num_threads())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowerml-bench-distill-") as temp:
        workdir = Path(args.workdir or temp)
        store, cache, published = publish(workdir, args)
        counts = {split: len(published.split_files(split)) for split in ("train", "valid",
                                                                           "test")}
        log(f"published {counts} at {args.source_size} px; training at {args.image_size} px")
        teacher_run = train(store, cache, "teacher",
                            config(args.teacher, args.teacher_epochs, 0, args))
        teacher = load_teacher(store, run_id="teacher")
        settings = DistillConfig(temperature=args.temperature, alpha=args.alpha,
                                 mixup=args.mixup)
        students: dict[str, list[dict[str, Any]]] = {"plain": [], "distilled": []}
        for seed in range(args.seeds):
            student_config = config(args.student, args.student_epochs, seed, args)
            for kind, task in (("plain", None),
                               ("distilled", DistillationTask(teacher, settings))):
                run_id = f"{kind}-{seed}"
                figures = train(store, cache, run_id, student_config, task)
                students[kind].append({"seed": seed, **figures,
                                       **judge(store, cache, run_id, teacher)})
        teacher_test = students["plain"][0]["teacher_test_top1"]
        student_model = load_teacher(store, run_id="plain-0")
        profiles = {
            "teacher": profile(teacher.trained, teacher.file_bytes, args.speed_seconds),
            "student": profile(student_model.trained, int(RunFiles(store, "plain-0").read_json(
                BEST.pointer)["size"]), args.speed_seconds)}
    plain, distilled = summarise(students["plain"]), summarise(students["distilled"])
    return {
        "benchmark": "distill",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "data": {"synthetic": True, "classes": args.classes, "images": counts,
                 "source_size": args.source_size, "image_size": args.image_size},
        "weights": "none",
        "teacher": {"arch": args.teacher, "epochs": args.teacher_epochs,
                    "best_valid_top1": teacher_run["best_valid_top1"],
                    "test_top1": round(teacher_test, 4),
                    "train_seconds": teacher_run["train_seconds"], **profiles["teacher"]},
        "student": {"arch": args.student, "epochs": args.student_epochs, "seeds": args.seeds,
                    **profiles["student"]},
        "distillation": settings.to_json(),
        "plain": plain,
        "distilled": distilled,
        "distillation_bought": {
            "test_top1": round(distilled["mean_test_top1"] - plain["mean_test_top1"], 4),
            "agreement_test": round(distilled["mean_agreement_test"]
                                    - plain["mean_agreement_test"], 4)},
        "student_vs_teacher": {
            "macs_ratio_224": round(profiles["teacher"]["macs_224"]
                                    / profiles["student"]["macs_224"], 2),
            "params_ratio": round(profiles["teacher"]["params"] / profiles["student"]["params"],
                                  2),
            "cpu_speedup_224": round(profiles["student"]["cpu_images_per_second_224"]
                                     / profiles["teacher"]["cpu_images_per_second_224"], 2),
            "cpu_speedup_train_size": round(profiles["student"]["cpu_images_per_second"]
                                            / profiles["teacher"]["cpu_images_per_second"], 2)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=32,
                        help="images per class (a quarter train, a quarter valid, half test)")
    parser.add_argument("--source-size", type=int, default=48, help="synthetic image side")
    parser.add_argument("--image-size", type=int, default=32, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2, help="student seeds per variant")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--speed-seconds", type=float, default=1.0,
                        help="timing budget of each CPU images/s figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--workdir", default=None, help="keep the data and runs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse(argv)), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
