"""Training on curated shards, generating from the result, evaluating it on a compositional prompt suite and
exporting it as a diffusers pipeline: ``curate train``, ``generate``, ``eval`` and ``export`` (see
:mod:`curate.train`)."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.base import ConfigError
from curate.cli.options import SetOpt, out

__all__ = ["eval_", "export_", "generate", "train_"]


def train_(
    config: Annotated[str, typer.Argument(help="The training YAML (see pipelines/train_demo.yaml).")],
    sets: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache",
            help="Only encode the captions (and, with a VAE, the images' latents) into OUTPUT/cache, then stop; "
            "training with data.cache: true reads them.",
        ),
    ] = False,
) -> None:
    """Train a text-to-image diffusion model on curated shards; running it again resumes from the latest
    checkpoint. Multi-GPU / multi-node: launch with torchrun (or srun under Slurm)."""
    from curate.base import TrainError
    from curate.train.config import load_train_config
    from curate.train.trainer import train

    cfg = load_train_config(config, [*(sets or []), *(["data.cache=true"] if cache else [])])
    say = lambda line: out.print(line, markup=False, highlight=False)  # noqa: E731
    scorers = {}
    if cfg.validation.adherence:  # the sample world's analyser, which the trainer itself does not know
        from curate.demo.adherence import adherence_of

        scorers["adherence"] = adherence_of
    try:
        if cfg.validation.vqa_model and not cache:
            scorers["vqa_score"] = _vqa_scorer(cfg.validation.vqa_model, str(config))
        if cache:
            from curate.train.trainer import Trainer

            Trainer(cfg, say=say, progress=False, prompt_scorers=scorers).build()
            return
        summary = train(cfg, say=say, progress=not quiet, prompt_scorers=scorers)
    except TrainError as e:
        raise ConfigError(str(e), config, "training") from None
    out.print(
        f"trained {summary['steps']} steps in {summary['seconds']:.0f}s; checkpoints in {cfg.output}/checkpoints"
    )


def generate(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint folder, or a training output (its latest).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    output: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs.")] = "generated",
    guidance: Annotated[float, typer.Option(help="Text guidance scale.")] = 3.0,
    rag: Annotated[
        str | None, typer.Option(help="A curate index: condition on retrieved neighbours.")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per prompt (the model's k).")] = None,
    rag_guidance: Annotated[float, typer.Option(help="Retrieval guidance scale.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    sampler: Annotated[str, typer.Option(help="ddim or dpm.")] = "ddim",
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Generate images from a trained checkpoint, optionally with retrieval augmentation (--rag INDEX)."""
    from curate.train.generate import generate as run_generate

    if sampler not in ("ddim", "dpm"):
        raise ConfigError([("--sampler", f"{sampler!r}: use ddim or dpm")])
    try:
        result = run_generate(
            checkpoint,
            prompt,
            out=output,
            rag=rag,
            k=k,
            guidance=guidance,
            rag_guidance=rag_guidance,
            steps=steps,
            sampler=sampler,
            seed=seed,
            device=device,
            images_per_prompt=n,
        )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    for path in result["paths"]:
        out.print(path)
    out.print(f"{len(result['paths'])} image(s) from {result['checkpoint']} (step {result['step']})")


def eval_(
    checkpoint: Annotated[
        str, typer.Argument(help="A checkpoint folder, or a training output (its latest).")
    ],
    suite: Annotated[
        str, typer.Option(help="A shipped prompt suite (geneval, world) or a JSONL file in GenEval's format.")
    ] = "geneval",
    vqa_model: Annotated[
        str | None,
        typer.Option(
            help="A VLM for VQAScore (default: the training config's validation.vqa_model, if any)."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for eval.json, eval.html and the images (default: "
            "OUTPUT/eval/<suite>-step-<n> beside the checkpoints).",
        ),
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 4,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Text guidance scale.")] = 3.0,
    sampler: Annotated[str, typer.Option(help="ddim or dpm.")] = "ddim",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """GenEval-style evaluation: generate a compositional prompt suite (single object, two objects, counting,
    colours, position, attribute binding) and score it per category with CLIPScore and VQAScore; on the sample
    world's suite also exactly, with the world's analyser, and how far the learned scores agree with it."""
    from pathlib import Path

    from curate.train.checkpoint import read_state
    from curate.train.eval import SuiteError, evaluate, load_suite

    if sampler not in ("ddim", "dpm"):
        raise ConfigError([("--sampler", f"{sampler!r}: use ddim or dpm")])
    if n < 1:
        raise ConfigError([("-n", f"{n}: at least one image per prompt")])
    try:
        prompts = load_suite(suite)
        state = read_state(checkpoint)
    except (SuiteError, FileNotFoundError) as e:
        raise ConfigError(str(e), what="evaluation") from None
    model = vqa_model or state["config"].get("validation", {}).get("vqa_model")
    scorers = {}
    if model:
        where = "--vqa-model" if vqa_model else "validation.vqa_model"
        scorers["vqa_score"] = _vqa_scorer(model, state["path"], where, "evaluation")
    exact = {}
    if prompts.exact == "world":  # the sample world's analyser, which the trainer itself does not know
        from curate.demo.adherence import adherence_of

        exact["adherence"] = adherence_of
    if output is None:
        ckpt = Path(state["path"])
        root = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        output = str(root / "eval" / f"{prompts.name}-step-{state['step']:08d}")
    say = lambda line: out.print(line, markup=False, highlight=False)  # noqa: E731
    result = evaluate(
        state["path"],
        prompts,
        output,
        images_per_prompt=n,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        device=device,
        scorers=scorers,
        exact=exact,
        say=say,
    )
    keys = [*result["metrics"], *result["exact"]]
    for cat in [*result["categories"].values(), {"label": "overall", **result["overall"]}]:
        shown = ", ".join(f"{k} {cat[k]:.4g}" for k in keys if cat[k] is not None)
        say(f"{cat['label']:>18}: {cat['n']} images; {shown}")
    say(f"wrote {output}/eval.json and {output}/eval.html")


def export_(
    output: Annotated[str, typer.Argument(help="A training output (or one of its checkpoint folders).")],
    folder: Annotated[str, typer.Argument(help="The new diffusers pipeline folder.")],
    step: Annotated[
        int | None, typer.Option(help="The checkpoint of this step (default: the latest).")
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="The EMA weights (default) or the live ones.")
    ] = True,
) -> None:
    """Write a checkpoint as a diffusers pipeline folder that DiffusionPipeline.from_pretrained loads: a Stable
    Diffusion pipeline for fine-tuned pipelines (plus LoRA weights for load_lora_weights), else curate's
    pipeline class shipped in the folder (load it with trust_remote_code=True)."""
    from curate.base import TrainError
    from curate.train.export import export_pipeline

    try:
        result = export_pipeline(output, folder, step=step, ema=ema)
    except (FileNotFoundError, FileExistsError, TrainError, ValueError) as e:
        raise ConfigError(str(e)) from None
    out.print(
        f"exported {result['checkpoint']} (step {result['step']}, {result['weights']} weights) to {folder} "
        f"as a {result['kind']} pipeline; load it with:",
        markup=False,
        highlight=False,
    )
    out.print(
        f"    from diffusers import DiffusionPipeline; {result['load']}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _vqa_scorer(model: str, source: str, where: str = "validation.vqa_model", what: str = "training"):
    """validation.vqa_model (or ``where``: the option that named it) as the trainer's ``vqa_score`` prompt
    scorer (VQAScore, curate.models.vqa)."""
    from curate.base import ModelNotFound
    from curate.models.hub import resolve_model
    from curate.models.vqa import VqaScorer

    try:
        return VqaScorer.load(resolve_model(where, model), model)
    except (ModelNotFound, ValueError) as e:
        raise ConfigError([(where, str(e))], source, what) from None
