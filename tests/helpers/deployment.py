"""The deployment tests' shared parts (tests/deploy/test_deployment*.py): deploy/demo.py's
LocalPrefect with its `prefect` commands run in one interpreter, the operations automations with
the tests' short zombie threshold, a tiny run's parameters, the processes below a worker, and
the check that a recovered run left nothing Running."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from demo import REPO, LocalPrefect  # noqa: E402

from tests.helpers.prefect_cli import CommandBatch, Outcome  # noqa: E402

# Heartbeats come every 30 s (Prefect's minimum); the tests' zombie threshold is just above it.
ZOMBIE_AFTER_S = 40
# deploy/prefect.yaml's retrain-on-new-data trigger, as `prefect deploy` names its automation.
NEW_DATA_TRIGGER = "flowerml-retrain-on-new-data"


class BatchedPrefect(LocalPrefect):
    """LocalPrefect whose `prefect ...` commands and `python deploy/automations/apply.py` run
    one after another in one interpreter (tests/helpers/prefect_cli.py), the same commands
    with the same environment and folder, without a ~1-2 CPU-s start of Prefect each. Its
    waits ask the API every 0.5 s (a read costs the server ~6 ms of CPU)."""

    poll_s = 0.5

    def __init__(self, root: Path, **options: object) -> None:
        super().__init__(root, **options)  # type: ignore[arg-type]
        self.batch: CommandBatch | None = None

    def command(self, *argv: str, timeout: float = 300) -> Outcome:
        """`argv` (`prefect ...`, `python SCRIPT.py ...`, `python -c CODE`) in the batch,
        started with the environment of the server that answered (a server that did not
        come up is replaced on another port)."""
        if self.batch is None:
            self.batch = CommandBatch(self.env, REPO)
        return self.batch.run(list(argv), timeout=timeout)

    def prefect(self, *args: str, timeout: float = 300) -> str:
        done = self.command("prefect", *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.output[-3000:]}")
        return done.output

    def apply_automations(self, path: Path) -> None:
        done = self.command("python", "deploy/automations/apply.py", str(path), timeout=120)
        assert done.returncode == 0, done.output[-3000:]

    def stop(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        super().stop()


def short_zombie_automations(tmp_path: Path) -> Path:
    text = (REPO / "deploy/automations/operations.yaml").read_text()
    assert text.count("within: 90") == 1
    path = tmp_path / "operations.yaml"
    path.write_text(text.replace("within: 90", f"within: {ZOMBIE_AFTER_S}"))
    return path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the flow-run process and anything it started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def run_params(source: Path, bucket: str, epochs: int) -> dict:
    """A tiny run. No ONNX export: what these tests follow (slots, crashes, resumes, events)
    does not depend on it, and tests/flows/test_retrain.py's story exports and checks one.
    MobileNetV3-Small rather than the demo's ResNet-18: its checkpoint (weights and AdamW's two
    moments, written to S3 after every epoch) is 18 MB instead of 134, and its steps ~3x
    cheaper, which is most of what these runs cost; at 32 px (the smallest size a config
    takes) its steps and the evaluation cost less again."""
    return {"source": str(source), "store": f"s3://{bucket}/ml", "export_onnx": False,
            "training": {"recipe": "demo", "arch": "mobilenet_v3_small", "epochs": epochs,
                         "image_size": 32, "batch_size": 8, "device": "cpu", "workers": 0},
            "gate": {"threshold": 0.0, "tolerance": 1.0}}


def assert_nothing_left_running(prefect: LocalPrefect, run: str) -> None:
    """The run graph of a recovered run: no task run left Running, one bar at 100%."""
    tasks = prefect.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run]}}})
    assert [t["name"] for t in tasks if t["state_type"] not in ("COMPLETED", "CRASHED")] == []
    bars = [a for a in prefect.api("/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run]}, "type": {"any_": ["progress"]}}})]
    assert [a["data"] for a in bars] == [100.0]
