"""What the commands share: the consoles they print to, the options several take, and loading a pipeline
with the overrides given on the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from curate.core.config import PipelineConfig, load_config

__all__ = ["PipelineArg", "SetOpt", "err", "load_pipeline", "out"]

err = Console(stderr=True, soft_wrap=True)  # long paths and messages stay on one line, whole
out = Console(soft_wrap=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: a.b=value (stages by name: stages.NAME.key=v)."),
]
PipelineArg = Annotated[str, typer.Argument(help="The pipeline YAML file.")]


def load_pipeline(
    pipeline: str, sets: list[str] | None, executor: str | None = None, address: str | None = None
) -> PipelineConfig:
    """The pipeline's config with ``--set`` overrides, and ``--executor`` / ``--address`` as overrides of
    ``executor.kind`` and ``executor.address`` (an address alone implies Ray)."""
    overrides = list(sets or [])
    if executor:
        overrides.append(f"executor.kind={executor}")
    if address:
        overrides.append(f"executor.address={address}")
        if not executor:
            overrides.append("executor.kind=ray")
    return load_config(pipeline, overrides)
