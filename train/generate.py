"""``curate generate``: images from a checkpoint, optionally conditioned on neighbours retrieved from an index.

    curate generate --checkpoint OUT/checkpoints/step-00001000 --prompt "a red circle on a blue background"
    curate generate --checkpoint OUT --prompt "..." --rag INDEX -k 4 --guidance 3 --rag-guidance 1.5

``--checkpoint`` may be a checkpoint folder or a training output (its latest checkpoint). The EMA weights are
used when the checkpoint has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from curate.train.checkpoint import load_weights, read_state
from curate.train.config import TrainConfig
from curate.train.model import Generator, load_frozen

__all__ = ["generate", "load_generator"]


def load_generator(checkpoint: str | Path, device: str = "cpu", ema: bool = True) -> tuple[Generator, dict]:
    state = read_state(checkpoint)
    cfg = TrainConfig.model_validate(state["config"])
    dev = torch.device(device)
    text, vae, pretrained = load_frozen(cfg.model, state.get("text_encoder", {}).get("run_clip"), dev)
    torch.manual_seed(cfg.seed)  # as in training: LoRA adapters are initialised before their weights load
    gen = Generator(cfg.model, cfg.data.resolution, text, vae, state.get("clip_dim"), pretrained)
    path = Path(state["path"])
    weights = (
        path / "ema.safetensors"
        if ema and (path / "ema.safetensors").exists()
        else path / "model.safetensors"
    )
    load_weights(gen.denoiser, weights, partial=cfg.model.lora is not None)
    gen.denoiser.to(dev).eval()
    return gen, state


def generate(
    checkpoint: str | Path,
    prompts: list[str],
    *,
    out: str | Path | None = None,
    rag: str | None = None,
    k: int | None = None,
    guidance: float = 3.0,
    rag_guidance: float = 1.0,
    steps: int = 25,
    sampler: str = "ddim",
    seed: int = 0,
    device: str = "cpu",
    images_per_prompt: int = 1,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt; written to ``out`` as PNGs when given."""
    gen, state = load_generator(checkpoint, device)
    all_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    neighbours = None
    if rag:
        if gen.denoiser.retrieval is None:
            raise ValueError(
                f"{state['path']} was trained without retrieval (model.retrieval): it cannot use --rag"
            )
        from curate.train.retrieval import generation_neighbours

        want = gen.denoiser.retrieval.k
        if k is not None and k != want:
            raise ValueError(f"this model was trained with k={want} neighbours; -k {k} does not fit")
        neighbours = generation_neighbours(gen, rag, all_prompts, device)
    images = gen.sample(
        all_prompts,
        neighbours=neighbours,
        guidance=guidance,
        rag_guidance=rag_guidance,
        steps=steps,
        sampler=sampler,
        seed=seed,
        device=device,
    )
    paths = []
    if out is not None:
        from PIL import Image

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            path = folder / f"{i // images_per_prompt:04d}-{i % images_per_prompt:02d}.png"
            Image.fromarray(img).save(path)
            paths.append(str(path))
    return {"images": images, "paths": paths, "checkpoint": state["path"], "step": state["step"]}
