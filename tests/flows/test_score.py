"""The score-images flow under Prefect's test harness: its embedded thread runner, and a real
Dask cluster (distributed.LocalCluster, 2 worker processes on 127.0.0.1) through prefect-dask,
including a worker SIGKILLed in the middle of a shard."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flowerml.io.storage_local import LocalStore
from flowerml.registry.versions import Registry
from flows.score import ScoreParams, score_images
from tests.helpers.images import write_jpeg
from tests.helpers.scoring import rows_in_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # Prefect's server, Dask processes


def params(photos: Path | str, registry_root: Path, output: Path, **options) -> ScoreParams:
    return ScoreParams(input=str(photos), output=str(output), store=str(registry_root),
                       runtime="torch", shard_size=2, batch_size=2, threads=1, **options)


def test_dask_workers_give_the_embedded_runners_output(prefect_harness: None,
                                                       registry_root: Path, photos: Path,
                                                       cluster, tmp_path: Path) -> None:
    embedded = score_images(params(photos, registry_root, tmp_path / "embedded"))
    on_dask = score_images(params(photos, registry_root, tmp_path / "dask",
                                  dask_address=cluster.scheduler_address))
    assert on_dask["input_id"] == embedded["input_id"] and on_dask["parts"] == embedded["parts"]
    assert (on_dask["images"], on_dask["failed"], on_dask["shards"]) == (8, 1, 4)
    for mine, theirs in zip(rows_in_folder(on_dask), rows_in_folder(embedded), strict=True):
        assert mine.keys() == theirs.keys() and mine["key"] == theirs["key"]
        assert mine.get("error") == theirs.get("error")
        if "labels" in mine:
            assert mine["labels"][0] == theirs["labels"][0]
            np.testing.assert_allclose(mine["probabilities"], theirs["probabilities"],
                                       atol=1e-5)
    again = score_images(params(photos, registry_root, tmp_path / "dask",
                                dask_address=cluster.scheduler_address))
    assert again["already_complete"]
    assert Registry(LocalStore(registry_root), "flowers102").get(1).weights_sha256 == \
        embedded["weights_sha256"] == embedded["sha256"]


def test_a_worker_killed_mid_shard_still_ends_with_every_shard_done_once(
        prefect_harness: None, registry_root: Path, cluster, tmp_path: Path) -> None:
    """Two shards each hold an image whose read waits (on the workers there are now) until the
    test releases it: once every other shard is done, each worker is inside one of those two
    shards. One worker is SIGKILLed there; Dask reruns its shard on the worker its nanny
    restarts. (A FIFO used to be the wait, but scoring now refuses FIFOs without opening them.)"""
    from distributed import Client

    images = [write_jpeg(tmp_path / f"img{i}.jpg", 64, 48, seed=i) for i in range(6)]
    held = [tmp_path / "hold-a.jpg", tmp_path / "hold-b.jpg"]
    for hold, image in zip(held, images[:2], strict=True):
        hold.write_bytes(image.read_bytes())
    release = tmp_path / "release"
    # Shards of 2, the held images in the last two: Dask hands out shards in the order they
    # were mapped, so no worker waits while a shard without a held image still waits for one.
    keys = [images[0], images[1], images[2], images[3], held[0], images[4], images[5], held[1]]
    listing = tmp_path / "keys.txt"
    listing.write_text("".join(f"{key}\n" for key in keys))
    output = tmp_path / "scores"
    options = params(listing, registry_root, output, dask_address=cluster.scheduler_address)
    outcome: dict = {}

    def hold_reads(release: str) -> None:
        """On a worker: reading a key named hold-* waits until `release` exists. Pickled by
        value (a closure), so the worker needs no test module."""
        import os
        import time

        from flowerml.serving import inputs

        original = getattr(inputs.KeyReader, "unheld_read", inputs.KeyReader.read)

        def read(self, key: str) -> bytes:
            while "hold-" in key and not os.path.exists(release):
                time.sleep(0.05)
            return original(self, key)

        inputs.KeyReader.unheld_read = original
        inputs.KeyReader.read = read

    def unhold_reads() -> None:
        from flowerml.serving import inputs

        if hasattr(inputs.KeyReader, "unheld_read"):
            inputs.KeyReader.read = inputs.KeyReader.unheld_read

    with Client(cluster.scheduler_address, timeout=60) as client:
        client.run(hold_reads, str(release))
        try:
            flow = threading.Thread(target=lambda: outcome.update(summary=score_images(options)))
            flow.start()
            pids = client.run(os.getpid)
            deadline = time.monotonic() + 120
            while not (len(list(output.rglob("part-*.jsonl"))) == 2 and all(
                    client.processing().values())):
                assert time.monotonic() < deadline and flow.is_alive(), "the shards never waited"
                time.sleep(0.2)
            victim = sorted(pids)[0]
            os.kill(pids[victim], signal.SIGKILL)
            release.touch()
            flow.join(timeout=150)
            assert not flow.is_alive(), "the flow did not finish after the worker was killed"
            restarted = client.run(os.getpid)
        finally:
            release.touch()
            client.run(unhold_reads)
    assert pids[victim] not in restarted.values()  # the killed worker is gone for good
    summary = outcome["summary"]
    # (A shard whose result lived on the killed worker is rerun too: it finds its part.)
    assert (summary["images"], summary["failed"], summary["shards"]) == (8, 0, 4)
    scored = rows_in_folder(summary)
    assert [row["key"] for row in scored] == [str(key) for key in keys]  # each exactly once
    assert sorted(p.name for p in Path(summary["output"]).glob("part-*")) == summary["parts"]


def test_python_m_flows_score_prints_the_summary_or_one_line(prefect_harness: None,
                                                             registry_root: Path, photos: Path,
                                                             tmp_path: Path,
                                                             free_tcp_port: int) -> None:
    from click.testing import CliRunner

    from flows.score import main

    base = ["--store", str(registry_root), "--runtime", "torch", "--shard-size", "4"]
    done = CliRunner().invoke(main, [str(photos), "--output", str(tmp_path / "s"), *base])
    assert done.exit_code == 1, (done.output, done.exception)  # one photo cannot be read
    summary = json.loads(done.stdout)
    assert (summary["images"], summary["failed"]) == (8, 1)
    assert summary["drift"]["scored"]["images"] == 7 and summary["drift"]["threshold"] == 0.2
    for args, message in (
            ([str(photos), "--output", str(tmp_path / "x"), *base, "--drift-threshold", "-1"],
             "score parameter drift_threshold: Input should be greater than or equal to 0"),
            ([str(photos), "--output", str(tmp_path / "x"), *base, "--review-below", "2"],
             "score parameter review_below: Input should be less than or equal to 1"),
            ([str(photos), "--output", str(tmp_path / "x"), *base, "--shard-size", "0"],
             "score parameter shard_size: Input should be greater than or equal to 1"),
            ([str(photos), "--output", str(tmp_path / "x"), *base, "--dask-address", "8786"],
             "score parameter dask_address: String should match pattern"),
            ([str(photos), "--output", str(tmp_path / "x"), *base, "--dask-address",
              f"tcp://127.0.0.1:{free_tcp_port}"],
             f"--dask-address tcp://127.0.0.1:{free_tcp_port}: no Dask scheduler answered "
             "within 5 s"),
            ([str(tmp_path / "none"), "--output", str(tmp_path / "x"), *base],
             f"INPUT {tmp_path / 'none'}: no such file or folder")):
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 2, refused.output
        # Prefect's own log lines come first when the flow ran; the last line is the verdict.
        assert refused.stderr.strip().splitlines()[-1].startswith(f"flowerml: error: {message}")
        assert not (tmp_path / "x").exists()
