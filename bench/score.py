"""Benchmark: batch scoring, per CPU core, against the tutorial's way of predicting, in one run.

What it measures, on the same JPEGs (synthetic, at the real archive's scale: longest side
500 px, quality 87), with the same random-weight model (`--weights none`: speed does not depend
on the values), for ResNet-18 and ResNet-152 at 224 px:

- tutorial: the original notebook's way to predict: a loop of `PIL.Image.open`, its eval
  transforms (Resize(256), CenterCrop(224), ToTensor, Normalize: flowerml's `tutorial` preset)
  and the eager model on a batch of 1.
- flowerml torch: `flowerml.serving.scoring_shards.score_rows`, torch runtime: JPEGs decoded reduced
  (PIL draft), one resize to the centre crop, uint8 batches of `--batch-size` through the eager
  model behind the export's normalisation (`PixelsToLogits`), top-5 rows.
- flowerml onnx: the same rows from ONNX Runtime's CPU provider running the model exported by
  `flowerml.serving.export.export_onnx` (the graph `flowerml export` writes).
- flowerml onnx-int8: the same rows from that graph statically quantised as `flowerml export
  --quantize int8` does (`flowerml.serving.quantize.quantize_int8`: QDQ, per-channel int8
  weights), calibrated on `CALIBRATION_IMAGES` other JPEGs of the same kind. With random
  weights its agreement with fp32 says nothing about the export gate (measured on real
  weights and the test split): it is printed only as a sanity figure.

All three run on one thread pinned to one core (torch and ONNX Runtime threads = 1, decoding
on the same thread), so images/s is images/s per core. Targets: ONNX batched >= 3x the
tutorial's way per core; int8 >= 5x for ResNet-18 and >= 3x for ResNet-152.

Then the `score-images` flow (Prefect, ephemeral server) with its shards on a Dask
`LocalCluster` of 1 and then 2 single-threaded workers (torch runtime, ResNet-18, one model
thread per worker), after a warm-up run that loads the model in every worker: images/s and the
speed-up. And the peak RSS of a fresh process that lists a 100,000-key input (a .txt list of
synthetic keys) into 100 shards on a local output (`plan_scoring`): target under 1 GB.

Prints exactly one JSON object on stdout; progress goes to stderr.

    python bench/score.py                       # 48 / 12 images per variant, 128 for Dask
    python bench/score.py --images 16 --large-images 4 --dask-images 64   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MB, load_average, peak_rss_mb, progress_log

TARGET_ONNX_VS_TUTORIAL = 3.0
TARGET_INT8_VS_TUTORIAL = {"resnet18": 5.0, "resnet152": 3.0}
CALIBRATION_IMAGES = 8
TARGET_RSS_MB = 1024
CLASSES = 102
SIZE = 224

log = progress_log("bench-score")


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs at the archive's scale: 500x375 and 375x500, smooth colour fields with
    detail and noise (~40 KB each at quality 87)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = (500, 375) if index % 2 else (375, 500)
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        phase = rng.uniform(0, 6.3, 3)
        channels = [np.sin(x * rng.uniform(4, 12) + y * rng.uniform(4, 12) + p) for p in phase]
        pixels = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (height, width, 3)))
        path = folder / f"image_{index:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=87)
        paths.append(path)
    return paths


def pin_to_one_core() -> int:
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    return core


# --------------------------------------------------------------------------------------------
# Per core: the tutorial's loop, flowerml torch batched, flowerml ONNX Runtime batched


def tutorial_images_per_second(model, paths: list[Path]) -> float:
    import torch
    from PIL import Image

    from flowerml.data.transforms import build_transforms

    transform = build_transforms("tutorial", SIZE, train=False)

    def predict(path: Path) -> None:
        with torch.no_grad():
            image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            torch.softmax(model(image), dim=1).topk(5)

    predict(paths[0])  # warm-up
    start = time.perf_counter()
    for path in paths:
        predict(path)
    return len(paths) / (time.perf_counter() - start)


def calibration_pixels(paths: list[Path]):
    """uint8 NCHW batches of `paths` (short side to 256, centre crop 224), one image each."""
    import numpy as np
    from PIL import Image

    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BILINEAR)
        left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
        crop = np.asarray(image.crop((left, top, left + SIZE, top + SIZE)))
        yield crop.transpose(2, 0, 1)[None].copy()


def exported_graphs(model, workdir: Path, calibration: list[Path]) -> dict[str, bytes]:
    """{"onnx": the fp32 graph `flowerml export` writes, "onnx-int8": it quantised as
    `--quantize int8` does}."""
    from flowerml.serving.export import export_onnx
    from flowerml.serving.quantize import quantize_int8

    path = workdir / f"model-{id(model)}.onnx"
    start = time.perf_counter()
    exporter = export_onnx(model, SIZE, path)
    log(f"exported ({exporter}) in {time.perf_counter() - start:.1f} s, "
        f"{path.stat().st_size / MB:.0f} MB")
    start = time.perf_counter()
    int8, _ = quantize_int8(path.read_bytes(), calibration_pixels(calibration))
    log(f"quantised to int8 in {time.perf_counter() - start:.1f} s, {len(int8) / MB:.0f} MB")
    return {"onnx": path.read_bytes(), "onnx-int8": int8}


def scorer_for(model, runtime: str, graphs: dict[str, bytes] | None = None):
    """A flowerml.serving.runtimes.Scorer over `model`, run by torch or by ONNX Runtime (one
    thread) on `graphs[runtime]`."""
    import torch

    from flowerml.serving.export import PixelsToLogits, build_onnx_session
    from flowerml.serving.runtimes import Scorer

    names = tuple(f"class {i}" for i in range(CLASSES))
    if runtime in ("onnx", "onnx-int8"):
        session = build_onnx_session(graphs[runtime], threads=1)
        return Scorer("bench", runtime, "", SIZE, names,
                      lambda pixels: session.run(["logits"], {"images": pixels})[0])
    wrapped = PixelsToLogits(model).eval()

    def logits(pixels):
        with torch.inference_mode():
            return wrapped(torch.from_numpy(pixels)).float().numpy()

    return Scorer("bench", "torch", "", SIZE, names, logits)


def flowerml_images_per_second(scorer, folder: Path, keys: list[str], batch_size: int) -> float:
    from flowerml.serving.inputs import KeyReader
    from flowerml.serving.scoring_shards import score_rows

    reader = KeyReader(str(folder))
    list(score_rows(scorer, reader, keys[:batch_size], batch_size=batch_size, top_k=5,
                    decode_threads=0))  # warm-up
    start = time.perf_counter()
    rows = list(score_rows(scorer, reader, keys, batch_size=batch_size, top_k=5,
                           decode_threads=0))
    seconds = time.perf_counter() - start
    assert len(rows) == len(keys) and all("labels" in row for row in rows)
    return len(keys) / seconds


def int8_agreement(graphs: dict[str, bytes], paths: list[Path]) -> float:
    """Share of `paths` whose top-1 the int8 graph and the fp32 one agree on."""
    import numpy as np

    from flowerml.serving.export import build_onnx_session

    pixels = np.concatenate(list(calibration_pixels(paths)))
    top1 = {runtime: build_onnx_session(graphs[runtime], threads=1).run(
        ["logits"], {"images": pixels})[0].argmax(1) for runtime in ("onnx", "onnx-int8")}
    return float((top1["onnx"] == top1["onnx-int8"]).mean())


def per_core(arch: str, paths: list[Path], batch_size: int, workdir: Path,
             calibration: list[Path]) -> dict:
    import torch

    from flowerml.models.backbones import build_model

    torch.set_num_threads(1)
    model = build_model(arch, CLASSES, seed=0).eval()
    keys = [path.name for path in paths]
    log(f"{arch}: tutorial loop on {len(paths)} images")
    tutorial = tutorial_images_per_second(model, paths)
    log(f"{arch}: flowerml torch, batch {batch_size}")
    eager = flowerml_images_per_second(scorer_for(model, "torch"), paths[0].parent,
                                       keys, batch_size)
    graphs = exported_graphs(model, workdir, calibration)
    log(f"{arch}: flowerml onnx, batch {batch_size}")
    onnx = flowerml_images_per_second(scorer_for(model, "onnx", graphs), paths[0].parent,
                                      keys, batch_size)
    log(f"{arch}: flowerml onnx-int8, batch {batch_size}")
    int8 = flowerml_images_per_second(scorer_for(model, "onnx-int8", graphs),
                                      paths[0].parent, keys, batch_size)
    result = {"images": len(paths), "batch_size": batch_size,
              "tutorial_images_per_s": round(tutorial, 2),
              "flowerml_torch_images_per_s": round(eager, 2),
              "flowerml_onnx_images_per_s": round(onnx, 2),
              "torch_vs_tutorial": round(eager / tutorial, 2),
              "onnx_vs_tutorial": round(onnx / tutorial, 2),
              "onnx_meets_target": onnx / tutorial >= TARGET_ONNX_VS_TUTORIAL,
              "flowerml_int8_images_per_s": round(int8, 2),
              "int8_vs_tutorial": round(int8 / tutorial, 2),
              "int8_vs_onnx": round(int8 / onnx, 2),
              "int8_meets_target": int8 / tutorial >= TARGET_INT8_VS_TUTORIAL[arch],
              "onnx_bytes": len(graphs["onnx"]), "int8_bytes": len(graphs["onnx-int8"]),
              "int8_top1_agreement_random_weights": round(int8_agreement(graphs, paths), 3)}
    log(f"{arch}: {json.dumps(result)}")
    return result


# --------------------------------------------------------------------------------------------
# score-images on Dask: 1 worker, then 2


def register_model(store_root: Path, arch: str) -> str:
    """A random-weight model registered as bench:1 (production) on a local store."""
    from flowerml.io.storage_local import LocalStore
    from flowerml.models.backbones import build_model
    from flowerml.registry.versions import Registry

    registry = Registry(LocalStore(store_root), "bench")
    card = {"arch": arch, "image_size": SIZE,
            "classes": [{"label": i + 1, "name": f"class {i}"} for i in range(CLASSES)]}
    version = registry.register(build_model(arch, CLASSES, seed=0).state_dict(), card)
    registry.set_alias("production", version.version, reason="bench", forced=True)
    return str(store_root)


def dask_scaling(workdir: Path, images: int, shard_size: int, batch_size: int) -> dict:
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from distributed import LocalCluster

    from flows.score import ScoreParams, score_images

    store = register_model(workdir / "store", "resnet18")
    warm = workdir / "dask-warm"
    write_images(warm, 4 * 2, seed=1)
    timed = workdir / "dask-images"
    write_images(timed, images, seed=2)
    result: dict = {"arch": "resnet18", "runtime": "torch", "images": images,
                    "shard_size": shard_size, "batch_size": batch_size,
                    "threads_per_worker": 1}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=":0", silence_logs=40) as cluster:
            def run(folder: Path, output: str, size: int, cluster=cluster) -> dict:
                return score_images(ScoreParams(
                    input=str(folder), output=str(workdir / output), store=store,
                    model="bench@production",
                    runtime="torch", shard_size=size, batch_size=batch_size, threads=1,
                    dask_address=cluster.scheduler_address))

            log(f"dask: {workers} worker(s), warm-up")
            run(warm, f"warm-{workers}", 4)  # loads the model in every worker
            log(f"dask: {workers} worker(s), {images} images")
            start = time.perf_counter()
            summary = run(timed, f"scores-{workers}", shard_size)
            wall = time.perf_counter() - start
        result[f"workers_{workers}"] = {
            "images_per_s": round(images / summary["seconds"], 2),
            "flow_seconds": summary["seconds"], "call_seconds": round(wall, 2)}
    result["speedup_2_vs_1"] = round(result["workers_2"]["images_per_s"]
                                     / result["workers_1"]["images_per_s"], 2)
    log(f"dask: {json.dumps(result)}")
    return result


# --------------------------------------------------------------------------------------------
# Peak RSS of listing 100,000 keys


def listing_rss(workdir: Path, keys: int, shard_size: int) -> dict:
    store = register_model(workdir / "rss-store", "resnet18")
    listing = workdir / "keys.txt"
    with open(listing, "w") as handle:
        for index in range(keys):
            handle.write(f"photos/{index // 1000:04d}/image_{index:07d}.jpg\n")
    log(f"listing {keys} keys in a fresh process")
    done = subprocess.run([sys.executable, __file__, "--listing-child", str(listing), store,
                           str(workdir / "rss-out"), str(shard_size)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout)
    result["meets_target"] = result["peak_rss_mb"] < TARGET_RSS_MB
    log(f"listing: {json.dumps(result)}")
    return result


def listing_child(listing: str, store: str, output: str, shard_size: int) -> None:
    # What every scoring process imports anyway (torch, via the export and the decoder), so
    # that the difference below is the listing's own memory.
    import flowerml.serving.export  # noqa: F401
    import flowerml.serving.prediction  # noqa: F401
    from flowerml.io.storage_local import LocalStore
    from flowerml.serving.scoring_plan import ScoringRequest, plan_scoring

    before = peak_rss_mb()
    start = time.perf_counter()
    plan = plan_scoring(ScoringRequest(input=listing, model="bench@production", output=output,
                                       runtime="torch", shard_size=shard_size),
                        registry_store=LocalStore(store), output_store=LocalStore(output))
    peak = peak_rss_mb()
    print(json.dumps({"keys": plan.images, "shards": plan.shards,
                      "seconds": round(time.perf_counter() - start, 2),
                      "peak_rss_after_imports_mb": round(before, 1),
                      "peak_rss_mb": round(peak, 1),
                      "listing_adds_mb": round(peak - before, 1)}))


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="ResNet-18 images per variant")
    parser.add_argument("--large-images", type=int, default=12,
                        help="ResNet-152 images per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dask-images", type=int, default=128)
    parser.add_argument("--dask-shard-size", type=int, default=16)
    parser.add_argument("--listing-keys", type=int, default=100_000)
    parser.add_argument("--listing-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.listing_child:
        listing, store, output, shard_size = args.listing_child
        listing_child(listing, store, output, int(shard_size))
        return

    import onnxruntime
    import torch

    started, load_at_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="flowerml-bench-score-") as temp:
        workdir = Path(temp)
        paths = write_images(workdir / "images", max(args.images, args.large_images))
        calibration = write_images(workdir / "calibration", CALIBRATION_IMAGES, seed=3)
        sizes = [p.stat().st_size for p in paths]
        affinity = sorted(os.sched_getaffinity(0))
        core = pin_to_one_core()
        results = {
            "resnet18": per_core("resnet18", paths[:args.images], args.batch_size, workdir,
                                 calibration),
            "resnet152": per_core("resnet152", paths[:args.large_images], args.batch_size,
                                  workdir, calibration)}
        os.sched_setaffinity(0, set(affinity))  # Dask's workers get every core
        torch.set_num_threads(len(affinity))
        dask = dask_scaling(workdir, args.dask_images, args.dask_shard_size, args.batch_size)
        listing = listing_rss(workdir, args.listing_keys, 1000)
    print(json.dumps({
        "benchmark": "bench/score.py",
        "machine": {"cpus": os.cpu_count(), "affinity": affinity, "pinned_core": core,
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": load_average(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "images": {"width_height": "500x375 / 375x500", "jpeg_quality": 87,
                   "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1), "image_size": SIZE},
        "per_core": results,
        "target_onnx_vs_tutorial": TARGET_ONNX_VS_TUTORIAL,
        "target_int8_vs_tutorial": TARGET_INT8_VS_TUTORIAL,
        "dask_scaling": dask,
        "listing_100k": listing,
        "target_peak_rss_mb": TARGET_RSS_MB,
        "seconds": round(time.perf_counter() - started, 1),
    }, sort_keys=True))


if __name__ == "__main__":
    main()
