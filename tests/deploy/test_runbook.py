"""deploy/README.md and deploy/prefect.yaml's comments, run: every `prefect ...`, `flowerml ...`
and `python deploy/...` command they give that needs no GPU, worker, Docker, Kubernetes,
systemd or internet runs against the session's Prefect server, in the runbook's order, as a
shell runs it from the repository root. Each command must still appear in the runbook exactly
as listed here, so a command edited there is edited here too, and the runbook cannot rot.

The `prefect` and `flowerml` commands, the `python deploy/...py` scripts and `python -c` run
one after another in one interpreter (tests/helpers/prefect_cli.py: the console scripts' entry
points, imported once instead of fifty times), each with its exit code and output; the rest
(shell variables, `VAR=value cmd`, curl) through bash.

What runs differently from the page (`Step.run`): the server's URL for prefect.internal:4200,
this test's folder for /tmp/flowerml-try, a second pool name where the runbook creates `gpu`
again with another type, `--watch` dropped (no worker takes the run here), and a schedule id
read from the previous command. Left out: `prefect server start` (the test's server stands in),
`prefect worker start` (blocks and would take the runs), docker, kubectl, helm, systemctl,
journalctl, nvidia-smi, curl/aws against the internet, and section 12 (worker stop and drain),
which the deployment tests exercise.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.prefect_cli import CommandBatch

REPO = Path(__file__).resolve().parents[2]
README = REPO / "deploy/README.md"
PREFECT_YAML = REPO / "deploy/prefect.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class Step:
    """A command as the runbook prints it; how it runs here; what it must do."""

    text: str
    run: dict[str, str] = field(default_factory=dict)  # replacements for this run only
    rc: int = 0
    says: str = ""  # a fragment of its output


QUICK_RUN = ("""prefect deployment run retrain-flowers/retrain-manual --params '{"params": """
             """{"source": "/tmp/flowerml-try/source", "training": {"recipe": "demo", """
             """"device": "cpu"}, "gate": {"threshold": 0.7}}}'""")
WATCHED_RUN = ("""prefect deployment run retrain-flowers/retrain-manual --watch \\\n  --params """
               """'{"params": {"training": {"recipe": "default", "epochs": 20}, "gate": """
               """{"threshold": 0.96}}}'""")
NO_WATCH = {"--watch \\\n  ": ""}
EVENT = ("""prefect event emit flowerml.model.promoted --resource-id flowerml.model.flowers102 \\
  --resource prefect.resource.name=flowers102 \\
  --payload '{"version": 0, "metrics": {"top1": 0.0, "top5": 0.0, "n": 0}, "reasons": """
         """["test event"], "run_id": "test", "dataset_version": "test"}'""")

STEPS = [
    # "The same path by hand, on a CPU"
    Step("prefect work-pool create gpu --type process --base-job-template "
         "deploy/pools/process.json", says="Created work pool 'gpu'"),
    Step("prefect work-pool set-concurrency-limit gpu 1"),
    Step("prefect work-pool create cpu --type process"),
    Step("prefect deploy --all --prefect-file deploy/prefect.yaml",
         says="Deployment 'distill-flowers/distill-manual' successfully created"),
    Step("python deploy/automations/apply.py deploy/automations/operations.yaml",
         says="applied automation flowerml-recover-crashed-retrain"),
    Step('flowerml synth "$TRY/source" --classes 10 --per-class 30 --image-size 96',
         says="wrote 300 images of 10 classes"),
    Step(QUICK_RUN, says="Created flow run"),
    Step("flowerml pools", says="gpu (process): 0/1 slots in use, 1 waiting"),
    Step("prefect flow-run ls --state Running"),
    Step("FLOWERML_STORE=/tmp/flowerml-try/store flowerml registry show flowers102", rc=2,
         says="model 'flowers102' has no versions on "),
    # 1. Prefect server
    Step("prefect config set PREFECT_API_URL=http://prefect.internal:4200/api",
         says="Set 'PREFECT_API_URL'"),
    Step("curl http://prefect.internal:4200/api/health", says="true"),
    # 2. Work pools (a pool has one type: the docker and kubernetes variants get names of
    # their own here)
    Step("prefect work-pool create gpu --type docker --base-job-template "
         "deploy/pools/docker.json", run={"create gpu": "create gpu-docker"}),
    Step("prefect work-pool create gpu --type kubernetes --base-job-template "
         "deploy/pools/kubernetes.json", run={"create gpu": "create gpu-k8s"}),
    Step("prefect work-pool set-concurrency-limit gpu 4"),
    Step("prefect work-pool inspect gpu", says="concurrency_limit=4"),
    Step("flowerml pools", says="gpu (process): 0/4 slots in use, 1 waiting"),
    Step("prefect work-pool update gpu --base-job-template deploy/pools/process.json"),
    Step("prefect work-pool update gpu --base-job-template deploy/pools/kubernetes.json",
         run={"update gpu": "update gpu-k8s"}),
    # 4. Store and credentials
    Step("flowerml registry list", says="no models on "),
    # 7. Register the deployments
    Step("prefect deployment ls", says="retrain-flowers/retrain-manual"),
    Step("prefect deploy --prefect-file deploy/prefect.yaml --name retrain-weekly --pool "
         "gpu-a100", says="retrain-flowers/retrain-weekly"),
    Step("prefect deployment schedule ls retrain-flowers/retrain-weekly", says="0 3 * * 1"),
    Step("prefect deployment schedule pause retrain-flowers/retrain-weekly <schedule-id>",
         says="Paused schedule"),
    # 8. Trigger a run
    Step("prefect deployment run retrain-flowers/retrain-manual", says="Created flow run"),
    Step(WATCHED_RUN, run=NO_WATCH, says="Created flow run"),
    Step("""prefect deployment run retrain-flowers/retrain-manual -p 'params={"gate": """
         """{"force": true}}'""", says="Created flow run"),
    Step("""prefect deployment run retrain-flowers/retrain-manual \\\n  --params '{"params": """
         """{"source": "s3://ml-artifacts/mirror/flowers102", "verify": true}}'""",
         says="Created flow run"),
    Step("""prefect deployment run ingest-flowers/ingest -p """
         """source='"s3://ml-artifacts/mirror/flowers102"' -p verify=true""",
         says="Created flow run"),
    Step("prefect deployment run distill-flowers/distill-manual", says="Created flow run"),
    # 8a. Retrain when the data changes
    Step("""prefect deployment run add-images/add-images -p source='"s3://ml-artifacts/inbox/"""
         """2026-12/"'""", says="Created flow run"),
    Step("prefect automation ls", says="flowerml-retrain-on-new-data"),
    Step("prefect event emit flowerml.dataset.published --resource-id flowerml.dataset.flowers102",
         says="Successfully emitted event 'flowerml.dataset.published'"),
    Step("""prefect deployment run distill-flowers/distill-manual --watch \\\n  --params """
         """'{"params": {"student": {"student": "resnet18", "epochs": 60, "gate": """
         """{"max_gap": 0.02}}}}'""", run=NO_WATCH, says="Created flow run"),
    Step("flowerml registry promote flowers102-small 3 --max-gap 0.02", rc=2,
         says="model 'flowers102-small' has no versions on "),
    # 9. Notify on promotion
    Step("""python -c "from prefect.blocks.notifications import SlackWebhook; \\\n"""
         """  SlackWebhook(url='https://hooks.slack.com/services/...')"""
         """.save('flowerml-alerts')\""""),
    Step("python deploy/automations/apply.py deploy/automations/notify-promotion.yaml \\\n"
         "  --block slack-webhook/flowerml-alerts",
         says="applied automation flowerml-weekly-retrain-needs-attention"),
    Step("prefect automation ls", says="flowerml-model-promoted"),
    Step(EVENT, says="Successfully emitted event 'flowerml.model.promoted'"),
    Step("python deploy/automations/apply.py deploy/automations/notify-drift.yaml \\\n"
         "  --block slack-webhook/flowerml-alerts", says="applied automation flowerml-model-drift"),
    Step("python deploy/automations/apply.py deploy/automations/retrain-on-drift.yaml",
         says="applied automation flowerml-retrain-on-drift"),
    # 10. Roll back a bad model (on a store with no models: the refusal names the store)
    Step("flowerml registry show flowers102", rc=2, says="has no versions on "),
    Step("flowerml registry history flowers102 --alias production", rc=2,
         says="has no versions on "),
    Step("flowerml registry rollback flowers102 --alias production", rc=2,
         says="has no versions on "),
    # 11. Multi-GPU runs
    Step("prefect work-pool create gpu-multi --type process --base-job-template "
         "deploy/pools/process.json"),
    Step("prefect work-pool set-concurrency-limit gpu-multi 1"),
    Step("""prefect deployment run retrain-flowers/retrain-manual --job-variable gpu_count=4 """
         """-p 'params={"training": {"nproc_per_node": 4}}'""", says="Created flow run"),
]


def runbook_text() -> str:
    """The runbook, and prefect.yaml's comments without their `# ` (where it names commands)."""
    comments = [line.lstrip("#").strip() for line in PREFECT_YAML.read_text().splitlines()
                if line.lstrip().startswith("#")]
    return README.read_text() + "\n" + "\n".join(comments)


def test_every_listed_command_is_in_the_runbook_as_written() -> None:
    text = words(runbook_text())  # prose wraps a command across lines
    missing = [step.text for step in STEPS if words(step.text) not in text]
    assert not missing, missing
    # prefect.yaml's header gives the one-deployment form that works (not flow/deployment)
    assert "--name retrain-weekly --pool gpu-a100" in PREFECT_YAML.read_text()
    assert "--name retrain-flowers/retrain-weekly" not in PREFECT_YAML.read_text()


def test_the_runbook_commands_run_against_a_server(prefect_harness: None,
                                                   tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    server = api.removesuffix("/api")
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "TRY": str(tmp_path), "FLOWERML_STORE": str(tmp_path / "store"),
           "FLOWERML_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "250",  # rich: no "…"
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with CommandBatch(env, REPO) as batch:
        created = batch.run(["prefect", "work-pool", "create", "gpu-a100", "--type", "process"])
        assert created.returncode == 0, created.output  # the pool the runbook's --pool names
        output = ""
        for step in STEPS:
            command = step.text.replace("http://prefect.internal:4200", server) \
                .replace("/tmp/flowerml-try", str(tmp_path))
            for old, new in step.run.items():
                command = command.replace(old, new)
            if "<schedule-id>" in command:
                command = command.replace("<schedule-id>", schedule_id(output))
            returncode, output = run_step(command, batch, env)
            assert returncode == step.rc, f"{command}\n{output[-3000:]}"
            assert words(step.says) in words(output), f"{command}\n{output[-3000:]}"  # wraps
            assert "Traceback" not in output, f"{command}\n{output[-3000:]}"


def run_step(command: str, batch: CommandBatch, env: dict[str, str]) -> tuple[int, str]:
    """`prefect ...`, `flowerml ...`, `python SCRIPT.py ...` and `python -c CODE` through the
    batch's one interpreter (the arguments split as bash splits them: these commands use
    quotes and line continuations only); anything else (shell variables, `VAR=value cmd`,
    curl) through bash."""
    argv = shlex.split(command.replace("\\\n", " "))
    if "$" not in command and (argv[0] in ("prefect", "flowerml") or (argv[0] == "python" and (
            argv[1].endswith(".py") or argv[1] == "-c"))):
        done = batch.run(argv)
        return done.returncode, done.output
    done = subprocess.run(["bash", "-c", command], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def words(text: str) -> str:
    return " ".join(text.split())


def schedule_id(listing: str) -> str:
    return re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                     listing).group(0)
