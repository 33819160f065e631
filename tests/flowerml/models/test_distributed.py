"""flowerml.models.distributed: device selection, and a real two-process gloo group joined as under
torchrun (torchrun itself launches the DDP run of tests/flowerml/training/test_fit.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flowerml.core.errors import UserError
from flowerml.models.distributed import (
    DEVICES,
    Placement,
    barrier,
    broadcast_flag,
    select_device,
    start_placement,
    stop_placement,
)
from tests.helpers.forked_commands import (
    TORCHRUN_VARIABLES,
    fork_call,
    reaped,
    torchrun_environment,
)
from tests.helpers.network import free_port


@pytest.fixture
def not_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# --- placement -----------------------------------------------------------------------------


def test_a_single_process_placement_is_the_main_one():
    placement = Placement(torch.device("cpu"))
    assert (placement.rank, placement.world_size) == (0, 1)
    assert placement.is_main and not placement.distributed


def test_other_ranks_are_not_main():
    assert Placement(torch.device("cpu"), rank=0, world_size=2).is_main
    second = Placement(torch.device("cpu"), rank=1, world_size=2)
    assert not second.is_main and second.distributed


# --- devices -------------------------------------------------------------------------------


def test_devices_are_the_cli_choices():
    assert DEVICES == ("auto", "cpu", "cuda")


def test_cpu_is_always_available():
    assert select_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto") == torch.device(expected)


def test_an_unknown_device_is_named():
    with pytest.raises(UserError) as err:
        select_device("tpu")
    assert str(err.value) == "--device must be one of auto, cpu, cuda: got 'tpu'"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(UserError) as err:
        select_device("cuda")
    assert str(err.value) == ("--device cuda: no CUDA GPU is available here "
                              "(torch.cuda.is_available() is False); use --device cpu or auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_with_a_gpu():
    assert select_device("cuda").type == "cuda"


# --- one process ---------------------------------------------------------------------------


def test_outside_torchrun_there_is_no_process_group(not_under_torchrun: None):
    placement = start_placement("cpu")
    assert placement == Placement(torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    # Collectives are plain values or no-ops without a group.
    assert broadcast_flag(placement, True) is True
    assert broadcast_flag(placement, False) is False
    barrier(placement)
    stop_placement(placement)


def test_a_bad_device_fails_before_any_group_is_joined(not_under_torchrun: None):
    with pytest.raises(UserError, match="--device must be one of"):
        start_placement("gpu")


# --- two processes under torchrun ------------------------------------------------------------


def join_agree_and_leave(out: Path) -> None:
    """One rank's part, run in its own (forked) process: join, agree, leave, and write down
    what it saw."""
    import torch.distributed as dist

    placement = start_placement("cpu")
    # Each rank proposes its own answer; rank 0's must win everywhere.
    decided = broadcast_flag(placement, placement.rank == 0)
    barrier(placement)
    row = {"rank": placement.rank, "world": placement.world_size, "main": placement.is_main,
           "distributed": placement.distributed, "device": str(placement.device),
           "decided": decided, "initialized": dist.is_initialized()}
    stop_placement(placement)
    row["after_stop"] = dist.is_initialized()
    # One file per rank: each rank's stdout is a file of its own too.
    (out / f"rank{placement.rank}.json").write_text(json.dumps(row))


@pytest.mark.slow  # two torch processes join a gloo group
def test_two_gloo_processes_join_agree_and_leave(tmp_path: Path):
    """The two ranks are started with torchrun's variables directly: a launcher process (one
    more interpreter importing torch) adds nothing to what is checked here. Each is forked
    from this process, which has imported torch and flowerml already."""
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    ranks = [fork_call(lambda: join_agree_and_leave(tmp_path),
                       {**env, **torchrun_environment(rank, port)}, tmp_path / "output",
                       name=f"rank{rank}")
             for rank in (0, 1)]
    with reaped(ranks):
        codes = [rank.wait(timeout=180) for rank in ranks]

    assert codes == [0, 0], [rank.stderr()[-3000:] for rank in ranks]
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert rows == [
        {"rank": 0, "world": 2, "main": True, "distributed": True, "device": "cpu",
         "decided": True, "initialized": True, "after_stop": False},
        {"rank": 1, "world": 2, "main": False, "distributed": True, "device": "cpu",
         "decided": True, "initialized": True, "after_stop": False},
    ]
