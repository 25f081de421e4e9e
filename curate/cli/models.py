"""``curate models``: the weights a pipeline needs; list them, fetch them for air-gapped clusters, train the
demo's CLIP (see :mod:`curate.models.manage`)."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.cli.options import PipelineArg, SetOpt, err, load_pipeline, out

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Model weights: list what a pipeline needs, fetch it for air-gapped clusters, train the demo's CLIP.",
    no_args_is_help=True,
)


@models_app.command("list")
def models_list(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """The weights files a pipeline's stages load, where they come from, and whether they are here."""
    from rich.table import Table

    from curate.core.pipeline import Pipeline
    from curate.models.manage import status
    from curate.models.weights import model_dir

    rows = status(Pipeline(load_pipeline(pipeline, sets)))
    table = Table("stage", "model", "source", "local path", "here", title=f"model directory: {model_dir()}")
    for r in rows:
        table.add_row(
            r.stage, r.spec.name, r.spec.source, str(r.path), "[green]yes" if r.present else "[red]no"
        )
    out.print(table if rows else "this pipeline loads no weights from the hub (bundled ones need nothing)")


@models_app.command("fetch")
def models_fetch(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Download every model a pipeline needs into the model directory (CURATE_MODEL_DIR); offline, list what
    is missing and where to put it. Exit code 2 when something is still missing."""
    from curate.core.pipeline import Pipeline
    from curate.models.manage import fetch_weights
    from curate.models.weights import model_dir

    results = fetch_weights(Pipeline(load_pipeline(pipeline, sets)))
    for r in results:
        mark = "[green]ok[/green]" if r.present else "[red]missing[/red]"
        out.print(f"{mark} {r.stage}: {r.spec.name} -> {r.path}")
        if r.error:
            out.print(f"    put {r.spec.source} there; {r.error}")
    missing = [r for r in results if not r.present]
    if missing:
        err.print(
            f"[red]{len(missing)} model(s) missing[/red] from {model_dir()}: run this where the hub is "
            "reachable and copy the model directory here (CURATE_MODEL_DIR), or put each file at its path"
        )
        raise typer.Exit(2)
    out.print(f"all {len(results)} model file(s) are in {model_dir()}" if results else "nothing to fetch")


@models_app.command("train-demo-clip")
def models_train_demo_clip(
    output: Annotated[str, typer.Argument(help="Folder for the checkpoint (open_clip hub layout).")],
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the trainer's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the small open_clip model the demo scores with, on the sample world's drawn scenes (CPU, minutes)."""
    from curate.demo.run import train_demo_clip

    info = train_demo_clip(output, err, steps, seed)
    out.print(
        f"saved {output}: {info['steps']} steps in {info['seconds']:.0f}s; calibrated threshold "
        f"{info['threshold']:.3f} (held-out precision {info['heldout_precision']:.3f}, "
        f"recall {info['heldout_recall']:.3f}); load it with model: local-dir:{output}"
    )
