"""Create or replace the automations of a deploy/automations/*.yaml file on the Prefect server.

    python deploy/automations/apply.py deploy/automations/operations.yaml
    python deploy/automations/apply.py deploy/automations/notify.yaml --block slack-webhook/flowerml-alerts

Automations are matched by name: one that exists is deleted and created anew, so applying a
file twice leaves one copy of each. `--block TYPE/NAME` puts that notification block's id in
place of the all-zero placeholder the notification files use. An action that names
`deployment: FLOW/NAME` (run-deployment) gets that deployment's id, so the files hold no ids
of one server. The server is PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


async def block_id(slug: str) -> str:
    kind, _, name = slug.partition("/")
    async with get_client() as client:
        return str((await client.read_block_document_by_name(name, kind)).id)


async def deployment_id(name: str) -> str:
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return str((await client.read_deployment_by_name(name)).id)
        except ObjectNotFound:
            raise SystemExit(f"deployment {name} is not on the server: register the "
                             "deployments first (prefect deploy --all --prefect-file "
                             "deploy/prefect.yaml)") from None


async def apply(path: Path, block: str | None) -> list[str]:
    text = path.read_text()
    if PLACEHOLDER in text:
        if not block:
            raise SystemExit(f"{path} sends notifications: give --block TYPE/NAME "
                             "(e.g. slack-webhook/flowerml-alerts)")
        text = text.replace(PLACEHOLDER, await block_id(block))
    documents = yaml.safe_load(text)["automations"]
    for document in documents:
        for action in document.get("actions", []):
            if "deployment" in action:
                action["deployment_id"] = await deployment_id(action.pop("deployment"))
    automations = [AutomationCore.model_validate(a) for a in documents]
    async with get_client() as client:
        for automation in automations:
            for existing in await client.read_automations_by_name(automation.name):
                await client.delete_automation(existing.id)
            await client.create_automation(automation)
    return [a.name for a in automations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--block", help="notification block as TYPE/NAME")
    args = parser.parse_args()
    for name in asyncio.run(apply(args.file, args.block)):
        print(f"applied automation {name}")


if __name__ == "__main__":
    sys.exit(main())
