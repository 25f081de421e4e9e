"""``curate models``: the weights a pipeline needs; list them, fetch them for air-gapped clusters, write
stand-ins (random weights of the real architecture) to rehearse a run without them, train the demo's CLIP
(see :mod:`curate.models.manage` and :mod:`curate.models.stand_in`)."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.cli.options import PipelineArg, SetOpt, err, load_pipeline, out

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Model weights: list what a pipeline needs, fetch it for air-gapped clusters, write stand-ins to "
    "rehearse without it, train the demo's CLIP.",
    no_args_is_help=True,
)

STAND_IN_WARNING = (
    "stand-ins are random weights of the real architectures: a run with them takes the real time and memory, "
    "but its scores, filters and captions mean nothing. Every *_model value they produce ends in "
    "' (stand-in)'; `curate models fetch` replaces them with the real weights."
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
        here = "[yellow]stand-in" if r.stand_in else "[green]yes" if r.present else "[red]no"
        table.add_row(r.stage, r.spec.name, r.spec.source, str(r.path), here)
    out.print(table if rows else "this pipeline loads no weights from the hub (bundled ones need nothing)")
    if any(r.stand_in for r in rows):
        err.print(f"[yellow]warning[/yellow]: {STAND_IN_WARNING}")


def _is_training_yaml(path: str) -> bool:
    """A training YAML (curate train) rather than a pipeline: a top-level data: section and no stages:."""
    from pathlib import Path

    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the pipeline loader reports it
    return isinstance(raw, dict) and "data" in raw and "stages" not in raw


@models_app.command("fetch")
def models_fetch(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Download every model a pipeline (or a training YAML: its pretrained pipeline, VAE and text encoder)
    needs into the model directory (CURATE_MODEL_DIR), replacing stand-ins once the real weights are
    downloaded; offline, list what is missing and where to put it. Exit code 2 when something is still
    missing or still a stand-in."""
    from curate.models.weights import model_dir

    if _is_training_yaml(pipeline):
        from curate.train.config import load_train_config
        from curate.train.pretrained import training_weights

        results = training_weights(load_train_config(pipeline, sets))
    else:
        from curate.core.pipeline import Pipeline
        from curate.models.manage import fetch_weights

        results = fetch_weights(Pipeline(load_pipeline(pipeline, sets)))
    for r in results:
        mark = (
            "[green]ok[/green]"
            if r.present
            else "[yellow]stand-in[/yellow]"
            if r.stand_in
            else "[red]missing[/red]"
        )
        out.print(f"{mark} {r.stage}: {r.spec.name} -> {r.path}")
        if r.error:
            out.print(f"    put {r.spec.source} there; {r.error}")
    missing = [r for r in results if not r.present]
    if missing:
        stand_ins = sum(r.stand_in for r in missing)
        err.print(
            f"[red]{len(missing)} model(s) missing[/red] from {model_dir()}"
            + (f" ({stand_ins} of them here as stand-ins only, which stay)" if stand_ins else "")
            + ": run this where the hub is reachable and copy the model directory here (CURATE_MODEL_DIR), or "
            "put each file at its path"
        )
        raise typer.Exit(2)
    out.print(f"all {len(results)} model file(s) are in {model_dir()}" if results else "nothing to fetch")


@models_app.command("stand-in")
def models_stand_in(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="Rewrite stand-ins already there (real weights are always kept)."),
    ] = False,
    config_from: Annotated[
        list[str] | None,
        typer.Option(
            "--config-from",
            help="A folder of published configs, <org>__<name>/config.json (with tokenizer_config.json, ...), "
            "for hub models curate keeps none of.",
        ),
    ] = None,
) -> None:
    """Write stand-ins of every model a pipeline loads where the real weights are not here: random weights
    of the real architecture, at the path and in the format of the real weights, so that a run rehearses
    with the real size, memory and speed (its outputs mean nothing)."""
    from curate.core.pipeline import Pipeline
    from curate.models.stand_in import write_stand_ins
    from curate.models.weights import model_dir

    results = write_stand_ins(
        Pipeline(load_pipeline(pipeline, sets)), replace=replace, config_dirs=config_from or []
    )
    for r in results:
        params = f"{r.parameters:,} parameters, " if r.parameters is not None else ""
        out.print(f"{r.stage}: {r.model} -> {r.path} ({params}{_size(r.bytes)}): {r.action}")
    if not results:
        out.print("this pipeline loads no weights from the hub (bundled ones need nothing)")
        return
    out.print(f"model directory: {model_dir()}")
    if any(r.action != "kept: real weights present" for r in results):
        err.print(f"[yellow]warning[/yellow]: {STAND_IN_WARNING}")


def _size(n: float) -> str:
    """Bytes in the units a person reads: 605.1 MB."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


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
