"""The e2e benchmark's comparison: the original tutorial's pipeline on the same archive and model,
one epoch measured and its whole run extrapolated.

Its split script re-saving every JPEG, ImageFolder with its PIL transforms, fp32, Adam, batch 48,
num_workers 0: one epoch of train + valid and part of the test split timed in a child process
of its own (`bench/e2e.py --tutorial-child`, so its imports are timed as a user pays them), its
full run (40 epochs) extrapolated, and also at flowerml's epoch count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, progress_log
from e2e_archive import CLASSES
from e2e_command import clean_environment, python_path
from e2e_stages import secs
from e2e_tracer import process_start_time

TUTORIAL_EPOCHS = 40
TUTORIAL_BATCH = 48
E2E_SCRIPT = Path(__file__).resolve().with_name("e2e.py")

log = progress_log("bench-e2e")


def tutorial_child(params: dict) -> dict:
    """Time the tutorial's pipeline: imports, its split script, its loaders and model, one
    epoch of training and validation, and the first `test_images` of its test evaluation."""
    started = process_start_time()
    timings: dict[str, float] = {}

    import torch
    import torchvision
    from ingest_methods import tutorial_prepare
    from torch.utils.data import DataLoader

    from flowerml.data.transforms import tutorial_transform

    timings["python start and imports"] = time.time() - started
    device = torch.device(params["device"])
    source, out_dir = Path(params["source"]), Path(params["scratch"])

    mark = time.time()
    tutorial_prepare(source, out_dir)  # extract, read the .mat files, re-save every JPEG
    timings["split script"] = time.time() - mark

    mark = time.time()
    size = params["image_size"]
    folders = {split: torchvision.datasets.ImageFolder(
        str(out_dir / "dataset" / split), tutorial_transform(size, train=split == "train"))
        for split in ("train", "valid", "test")}
    loaders = {split: DataLoader(data, batch_size=TUTORIAL_BATCH, shuffle=True, num_workers=0)
               for split, data in folders.items()}
    model = getattr(torchvision.models, params["arch"])(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, CLASSES)  # the new head; nothing frozen
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    timings["loaders and model build"] = time.time() - mark

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mark = time.time()
    model.train()
    for inputs, labels in loaders["train"]:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
    synchronise()
    timings["epoch train"] = time.time() - mark

    def evaluate(loader, limit: int | None) -> tuple[float, int]:
        model.eval()
        seen, begun = 0, time.time()
        with torch.no_grad():
            for inputs, labels in loader:
                criterion(model(inputs.to(device)), labels.to(device))
                seen += len(labels)
                if limit is not None and seen >= limit:
                    break  # before the loader decodes a batch that would not be counted
        synchronise()
        return time.time() - begun, seen

    timings["epoch valid"], _ = evaluate(loaders["valid"], None)
    test_seconds, test_seen = evaluate(loaders["test"], params["test_images"])
    return {"seconds": {k: secs(v) for k, v in timings.items()},
            "test_timed": {"images": test_seen, "seconds": secs(test_seconds)},
            "images": {split: len(data) for split, data in folders.items()}}


def run_tutorial(archive: Path, scratch: Path, *, arch: str, image_size: int, device: str,
                 test_images: int, epochs_full: int, epochs_same: int) -> dict:
    """The tutorial's timings (measured) and its whole run extrapolated."""
    params = {"source": str(archive), "scratch": str(scratch), "arch": arch,
              "image_size": image_size, "device": device, "test_images": test_images}
    log(f"tutorial pipeline: {arch} at {image_size} px on {device}, one epoch ...")
    env = {**clean_environment(), "PYTHONPATH": python_path(REPO)}
    started = time.time()
    done = subprocess.run([sys.executable, str(E2E_SCRIPT), "--tutorial-child",
                           json.dumps(params)], env=env, stdout=subprocess.PIPE, text=True,
                          check=True)
    wall = time.time() - started
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    seconds, test = measured["seconds"], measured["test_timed"]
    test_full = test["seconds"] / max(test["images"], 1) * measured["images"]["test"]
    fixed = (seconds["python start and imports"] + seconds["split script"]
             + seconds["loaders and model build"])
    per_epoch = seconds["epoch train"] + seconds["epoch valid"]

    def whole_run(epochs: int) -> dict:
        return {"epochs": epochs, "seconds": secs(fixed + epochs * per_epoch + test_full),
                "stages": [{"stage": k, "seconds": v} for k, v in seconds.items()
                           if not k.startswith("epoch")]
                + [{"stage": "epochs train", "seconds": secs(epochs * seconds["epoch train"])},
                   {"stage": "epochs valid", "seconds": secs(epochs * seconds["epoch valid"])},
                   {"stage": "test evaluation", "seconds": secs(test_full)}]}

    log(f"tutorial: one epoch {per_epoch:.1f} s (train {seconds['epoch train']:.1f} s), "
        f"split script {seconds['split script']:.1f} s")
    return {"measured": measured, "measured_wall_seconds": secs(wall),
            "setup": {"arch": arch, "image_size": image_size, "device": device,
                      "batch_size": TUTORIAL_BATCH, "num_workers": 0, "precision": "fp32",
                      "optimizer": "Adam lr 1e-3",
                      "loop": "per epoch: train over the train split, then evaluate valid; "
                              "test once at the end (the notebook iterated its test loader "
                              "in the training loop, which would be ~6x slower per epoch)"},
            "extrapolated_full_run": whole_run(epochs_full),
            "extrapolated_same_epochs": whole_run(epochs_same)}
