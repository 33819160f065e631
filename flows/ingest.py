"""The `ingest_flowers` flow: fetch the Flowers-102 sources, then publish the official split;
and `add_images_flow`: labelled images added on top of the dataset's CURRENT version.

Run it with `python -m flows.ingest [--source ...] [--store ...]`, from a deployment, or as the
first stage of the retrain flow.
"""

from __future__ import annotations

import json
from typing import Literal

import click
from prefect import flow
from prefect.runtime import flow_run

from flowerml.cli import dataset_option, store_option
from flowerml.settings import load_settings
from tasks.ingest import add_images_task, fetch_sources_task, publish_split_task


def run_name() -> str:
    """`ingest flowers102 from official`: an unset dataset is named as the worker resolves it."""
    parameters = flow_run.parameters
    dataset = parameters.get("dataset") or load_settings().dataset
    return f"ingest {dataset} from {parameters.get('source', 'official')}"


@flow(name="ingest-flowers", flow_run_name=run_name, log_prints=True)
def ingest_flowers(source: str = "official", dataset: str | None = None,
                   store: str | None = None, verify: bool = False) -> dict:
    """Fetch the three source files onto the store, then publish train/valid/test."""
    fetched = fetch_sources_task(source, dataset, store, verify)
    return publish_split_task(fetched["dataset"], fetched["store"])


def add_run_name() -> str:
    parameters = flow_run.parameters
    dataset = parameters.get("dataset") or load_settings().dataset
    return f"add {parameters.get('source')} to {dataset}"


@flow(name="add-images", flow_run_name=add_run_name, log_prints=True)
def add_images_flow(source: str, dataset: str | None = None, split: Literal["train", "valid"]
                    = "train", store: str | None = None) -> dict:
    """Publish the dataset's CURRENT version plus the labelled images SOURCE names (a folder
    of class folders, a .csv/.jsonl list, an s3:// prefix): `flowerml ingest --add`."""
    return add_images_task(source, dataset, split, store)


@click.command()
@click.option("--source", default="official", show_default=True)
@dataset_option
@store_option
@click.option("--verify/--no-verify", default=False)
def main(source: str, dataset: str | None, store: str | None, verify: bool) -> None:
    """Run the ingest flow once and print its summary as JSON."""
    click.echo(json.dumps(ingest_flowers(source, dataset, store, verify), sort_keys=True))


if __name__ == "__main__":
    main()
