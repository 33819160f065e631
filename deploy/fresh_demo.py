"""`make fresh-demo`: keeping the model fresh, end to end, on this machine's CPU.

On a local Prefect server with deploy/prefect.yaml registered (the demo parameters set on the
deployments, as an operator would set theirs) and one worker per pool, it:

1. runs retrain-manual: version 1 is trained and promoted to production;
2. adds labelled images to the dataset with the add-images deployment: the new version's
   `flowerml.dataset.published` event starts retrain-on-new-data, which trains version 2 on
   the new CURRENT, gated on the same test manifest as version 1, and promotes it;
3. runs retrain-weekly, as its schedule would: nothing changed since version 2, so the run
   ends `Up to date` in seconds, without training.

It prints each step's flow run, state and time, and the UI URL; `--keep` keeps the server up
to look at the runs and the trigger in the UI. Everything lives under ./flowerml-fresh-demo/.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from demo import DEMO_TRAINING, LocalPrefect, demo_folder, local_prefect, store_env

# The demo's gate: a floor the demo recipe clears on the synthetic data, and room for a model
# trained on more images to differ a little from the one before (the default tolerance is
# 0.005 on the real test split's 6,149 images; the demo's test split is 150 images).
DEMO_GATE = {"threshold": 0.7, "tolerance": 0.05}
NEW_IMAGES_PER_CLASS = 4
MIN_NEW_IMAGES = 30  # the real deployment waits for 50; the demo adds 40


def set_demo_parameters(prefect: LocalPrefect, source: Path) -> None:
    """The retrain deployments' defaults, set to the demo's data, recipe and gate (the event
    trigger and the schedule run a deployment with its defaults)."""
    params = {"source": str(source), "training": DEMO_TRAINING, "gate": DEMO_GATE}
    for name in ("retrain-weekly", "retrain-manual"):
        prefect.set_deployment_params(f"retrain-flowers/{name}", **params)
    prefect.set_deployment_params("retrain-flowers/retrain-on-new-data", **params,
                                  min_new_images=MIN_NEW_IMAGES)


def finish(prefect: LocalPrefect, step: str, run_id: str, started: float) -> dict[str, Any]:
    run = prefect.wait_for_final_state(run_id, timeout=900)
    print(f"{step}: flow run {run['name']} {run['state_name']} after "
          f"{time.monotonic() - started:.0f} s ({prefect.url}/runs/flow-run/{run_id})",
          flush=True)
    if run["state_type"] != "COMPLETED":
        raise RuntimeError(f"{step} ended {run['state_name']}: see {prefect.root}/*.log")
    return run


def production_card(root: Path) -> dict[str, Any]:
    from flowerml.io.storage_local import LocalStore
    from flowerml.registry.versions import Registry

    return Registry(LocalStore(root / "store"), "flowers102").resolve("production").card


def demonstrate(prefect: LocalPrefect, root: Path) -> None:
    prefect.set_up_deployments()
    set_demo_parameters(prefect, root / "source")
    prefect.start_worker("gpu", "--limit", "1", name="worker-gpu")
    prefect.start_worker("cpu", name="worker-cpu")

    started = time.monotonic()
    first = prefect.start_run("retrain-flowers/retrain-manual", {})
    finish(prefect, "1. retrain-manual", first, started)
    v1 = production_card(root)
    print(f"   production: flowers102:{v1['version']} on dataset "
          f"{v1['lineage']['dataset_version']}", flush=True)
    # The first ingest published the dataset, so retrain-on-new-data was started too: it ends
    # Up to date (no training image is new to production).
    queued = prefect.wait_for_triggered_run("retrain-flowers/retrain-on-new-data", set())
    finish(prefect, "   retrain-on-new-data (the first ingest's event)", queued, started)

    from flowerml.data.synthetic import write_labelled_folders

    added = write_labelled_folders(root / "new-images", classes=10,
                                   per_class=NEW_IMAGES_PER_CLASS, image_size=96, seed=2026)
    known = {run["id"] for run in prefect.runs_of("retrain-flowers/retrain-on-new-data")}
    started = time.monotonic()
    add = prefect.start_run("add-images/add-images",
                         {"source": str(root / "new-images")})
    finish(prefect, f"2. add-images ({added} labelled images)", add, started)
    retrain = prefect.wait_for_triggered_run("retrain-flowers/retrain-on-new-data", known)
    finish(prefect, "   retrain-on-new-data (the addition's event)", retrain, started)
    v2 = production_card(root)
    same = v2["test_manifest_sha256"] == v1["test_manifest_sha256"]
    print(f"   production: flowers102:{v2['version']} on dataset "
          f"{v2['lineage']['dataset_version']} (top-1 {v2['metrics']['top1']:.4f}; test "
          f"manifest {'the same as' if same else 'NOT the same as'} version {v1['version']}'s)",
          flush=True)

    started = time.monotonic()
    weekly = prefect.start_run("retrain-flowers/retrain-weekly", {})
    run = finish(prefect, "3. retrain-weekly (as its schedule runs it)", weekly, started)
    print(f"   {run['state']['message']}", flush=True)


def main() -> int:
    args = demo_folder(__doc__.splitlines()[0], "flowerml-fresh-demo")
    root, env = args.dir, store_env(args.dir)
    with local_prefect(root, env=env) as prefect:
        print(f"Prefect server and UI: {prefect.url} (logs in {root})", flush=True)
        demonstrate(prefect, root)
        print(f"UI: {prefect.url}/runs", flush=True)
        if args.keep:
            print("serving until Ctrl-C ...", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
