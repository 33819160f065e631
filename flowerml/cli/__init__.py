"""The `flowerml` command: each subcommand reads the settings once and calls the library.

`app` holds the group and what every command shares (one-line errors, `--json`, options);
the other modules add their commands to it when imported here.
"""

from flowerml.cli import (  # noqa: F401  (each registers its commands)
    compare,
    data,
    datasets,
    distill,
    export,
    predict,
    registry,
    runs,
    score,
    training,
)
from flowerml.cli.app import (
    DEVICES,
    Choice,
    CliError,
    alias_option,
    cli,
    dataset_option,
    emit_json,
    json_option,
    store_option,
    training_options,
)

__all__ = ["DEVICES", "Choice", "CliError", "alias_option", "cli", "dataset_option",
           "emit_json", "json_option", "main", "store_option", "training_options"]


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="flowerml")
