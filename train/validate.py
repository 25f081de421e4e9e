"""Validation during and after training, on rank 0, with the EMA weights when there are any.

- a sample grid of ``validation.prompts`` (``<output>/samples/step-<n>.png``, also in TensorBoard);
- CLIPScore (100 * max(cos, 0), averaged) of images generated for the evaluation prompts, with the
  curation's CLIP (the text encoder's, when it is an open_clip model);
- FID and KID between ``fid_samples`` held-out shard images and images generated for their captions; the
  feature extractor is Inception when ``inception_weights`` is given, else the curation's CLIP image tower
  (its name is recorded: numbers from different extractors do not compare);
- any prompt scorers the caller supplies (:data:`PromptScorer`): ``curate demo`` and ``curate train`` supply
  the sample world's exact prompt-adherence analyser as ``adherence`` (``validation.adherence``). The trainer
  knows no scorer of its own, so it never imports the demo.

Each validation appends one line to ``<output>/validation.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["PromptScorer", "grid_image", "validate"]

# Generated images and the prompts they were made for -> metrics by name. A scorer named ``s`` returning
# ``{"s": 0.7, "n": 64}`` is logged as ``s`` and ``s_n``.
PromptScorer = Callable[[list[Image.Image], list[str]], dict[str, float]]


def grid_image(images: np.ndarray, captions: list[str] | None = None, columns: int = 8, scale: int = 2):
    """uint8 [n, H, W, 3] -> one PIL grid; each cell scaled up ``scale`` times, captions under the cells."""
    from PIL import ImageDraw

    n = len(images)
    if n == 0:
        return Image.new("RGB", (8, 8))
    h, w = images.shape[1] * scale, images.shape[2] * scale
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    label = 26 if captions else 0
    cell_w = max(w, 96) if captions else w
    grid = Image.new("RGB", (cols * cell_w, rows * (h + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * cell_w, r * (h + label)
        grid.paste(Image.fromarray(img).resize((w, h), Image.Resampling.NEAREST), (x, y))
        if captions:
            words = captions[i].split()
            half = (len(words) + 1) // 2
            for line_no, line in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
                draw.text((x + 2, y + h + 1 + 12 * line_no), line[: cell_w // 6], fill="black")
    return grid


def _eval_prompts(trainer, n: int) -> list[str]:
    v = trainer.cfg.validation
    if v.eval_prompts:
        return list(v.eval_prompts)[:n] if n else list(v.eval_prompts)
    if trainer.cfg.data.holdout <= 0:
        return list(v.prompts)
    from curate.train.data import holdout_samples

    return [caption for _, caption, _ in holdout_samples(trainer.shards, trainer.cfg.data, n)]


def _neighbours(trainer, prompts: list[str]) -> Any:
    r = trainer.cfg.model.retrieval
    if r is None or not prompts:
        return None
    from curate.train.retrieval import generation_neighbours

    return generation_neighbours(trainer.gen, r.index, prompts, trainer.device)


def validate(trainer, denoiser, step: int) -> dict[str, Any]:
    v = trainer.cfg.validation
    gen, dev, out = trainer.gen, trainer.device, Path(trainer.cfg.output)
    started = time.perf_counter()
    denoiser.eval()
    kw = dict(
        denoiser=denoiser,
        guidance=v.guidance,
        rag_guidance=v.rag_guidance,
        steps=v.sample_steps,
        sampler=v.sampler,
        seed=v.seed,
        device=dev,
    )
    result: dict[str, Any] = {"step": step, "metrics": {}}
    if v.prompts:
        images = gen.sample(v.prompts, neighbours=_neighbours(trainer, v.prompts), **kw)
        grid = grid_image(images, v.prompts)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        path = out / "samples" / f"step-{step:08d}.png"
        grid.save(path)
        result["grid"] = np.asarray(grid)
        result["grid_path"] = str(path)
    m = result["metrics"]
    clip = gen.text.clip
    others = {k: f for k, f in trainer.prompt_scorers.items() if k != "adherence"}
    if v.eval_samples and (v.clip_score or v.adherence or others):
        prompts = _eval_prompts(trainer, v.eval_samples)
        images = gen.sample(prompts, neighbours=_neighbours(trainer, prompts), **kw)
        if v.clip_score and clip is not None and prompts:
            from curate.train.metrics import clip_score

            img_emb = clip.encode_images([clip.preprocess(Image.fromarray(x)) for x in images])
            txt_emb = clip.encode_texts(prompts)
            m["clip_score"] = clip_score(img_emb, txt_emb)
        if v.adherence and prompts:
            a = trainer.prompt_scorers["adherence"]([Image.fromarray(x) for x in images], prompts)
            per_prompt = a.pop("per_prompt", None)
            if per_prompt is not None:  # beside the metrics: for intervals over the prompts
                result["per_prompt"] = {"adherence": per_prompt}
            m.update({f"adherence_{k}" if k != "adherence" else k: val for k, val in a.items()})
        # Every other scorer the caller gives (VQAScore with validation.vqa_model): its mean under its own
        # name, its other numbers as <name>_<key>, its per-prompt scores beside adherence's.
        for key, scorer in others.items():
            if not prompts:
                break
            r = scorer([Image.fromarray(x) for x in images], prompts)
            per_prompt = r.pop("per_prompt", None)
            if per_prompt is not None:
                result.setdefault("per_prompt", {})[key] = per_prompt
            m.update({k if k == key else f"{key}_{k}": val for k, val in r.items()})
    if v.fid_samples:
        from curate.train.data import holdout_samples
        from curate.train.metrics import frechet_distance, kernel_inception_distance, load_feature_extractor

        real = holdout_samples(trainer.shards, trainer.cfg.data, v.fid_samples)
        if len(real) >= 2:
            fake = gen.sample(
                [c for _, c, _ in real], neighbours=_neighbours(trainer, [c for _, c, _ in real]), **kw
            )
            fx = load_feature_extractor(v.feature_extractor, clip=clip, inception_weights=v.inception_weights)
            a = fx([Image.fromarray(x) for x, _, _ in real])
            b = fx([Image.fromarray(x) for x in fake])
            m["fid"] = frechet_distance(a, b)
            m["kid"], m["kid_std"] = kernel_inception_distance(a, b, subset_size=min(len(a), 1000))
            m["fid_features"] = fx.name
            m["fid_n"] = len(real)
    m["seconds"] = time.perf_counter() - started
    line = {k: val for k, val in result.items() if k != "grid"}
    with open(out / "validation.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    shown = ", ".join(f"{k} {val:.4g}" if isinstance(val, float) else f"{k} {val}" for k, val in m.items())
    trainer.say(f"step {step}: {shown}")
    denoiser.train()
    return result
