"""``curate export TRAIN_OUTPUT DIR [--step N] [--ema/--no-ema]``: a checkpoint as a diffusers pipeline folder,
so that the model leaves curate and loads where diffusers runs.

What the folder holds depends on what was trained:

- a fine-tuned pretrained pipeline (``model.pretrained``), or any model with a transformers CLIP text
  encoder, a VAE and no pooled-text conditioning: a ``StableDiffusionPipeline`` folder (unet/, vae/,
  text_encoder/, tokenizer/, scheduler/), loaded with ``DiffusionPipeline.from_pretrained(DIR)``;
- LoRA (``model.lora``): the base pipeline's folder plus ``pytorch_lora_weights.safetensors`` (diffusers'
  LoRA format, as ``save_lora_weights`` writes it): ``from_pretrained(DIR)`` gives the base model and
  ``pipe.load_lora_weights(DIR)`` adds the trained adapters;
- curate's own models (open_clip text tower, pooled text added to the timestep embedding, pixel space):
  the open_clip text tower converted to a transformers ``CLIPTextModelWithProjection`` (weights mapped one to
  one) with a ``CLIPTokenizer`` built from open_clip's BPE vocabulary, and the pipeline class that runs them,
  ``curate_pipeline.py`` (:mod:`curate.train.diffusers_pipeline`), named in ``model_index.json``: loaded with
  ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)``.

The scheduler is the sampler of ``validation.sampler`` (DDIM or DPM-Solver) built from the training noise
schedule, so the pipeline samples as ``curate generate`` does. The UNet is the EMA weights by default.
Models trained with retrieval tokens (``model.retrieval``) cannot be exported: no diffusers pipeline feeds
neighbours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from curate.base import TrainError
from curate.train.checkpoint import PREFIX, latest_checkpoint

__all__ = [
    "PIPELINE_FILE",
    "checkpoint_at",
    "export_pipeline",
    "open_clip_text_to_transformers",
    "open_clip_tokenizer",
]

PIPELINE_FILE = "curate_pipeline.py"
PIPELINE_CLASS = "CurateTextToImagePipeline"


def checkpoint_at(output: str | Path, step: int | None = None) -> Path:
    """The checkpoint of ``step`` under a training output (default: the latest), or ``output`` itself when it
    is a checkpoint folder."""
    path = Path(output)
    if (path / "state.json").exists() and step is None:
        return path
    if step is None:
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{output}: no checkpoint (checkpoints/{PREFIX}*/state.json) in it")
        return found
    found = path / "checkpoints" / f"{PREFIX}{step:08d}"
    if not (found / "state.json").exists():
        have = sorted(p.name for p in (path / "checkpoints").glob(f"{PREFIX}*"))
        raise FileNotFoundError(
            f"{output}: no checkpoint of step {step} (there are: {', '.join(have) or 'none'})"
        )
    return found


def export_pipeline(
    output: str | Path, folder: str | Path, step: int | None = None, ema: bool = True
) -> dict[str, Any]:
    """Write the checkpoint (``step``, default the latest) of a training output as a diffusers pipeline folder.

    Returns what was written: ``kind`` (``stable_diffusion``, ``lora`` or ``curate``), ``load`` (the Python
    line that loads it), ``checkpoint``, ``step`` and ``weights`` (``ema`` or ``model``)."""
    from curate.train.generate import load_generator

    ckpt = checkpoint_at(output, step)
    target = Path(folder)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty: export into a new folder")
    gen, state = load_generator(ckpt, ema=ema)
    weights = "ema" if ema and (ckpt / "ema.safetensors").exists() else "model"
    if gen.denoiser.retrieval is not None:
        raise TrainError(
            f"{ckpt} was trained with retrieval tokens (model.retrieval): no diffusers pipeline feeds neighbours, "
            "so it cannot be exported; use curate generate --rag"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        kind = _write(gen, state, tmp)
        (tmp / "curate_export.json").write_text(
            json.dumps(
                {"checkpoint": str(ckpt), "step": state["step"], "weights": weights, "kind": kind}, indent=2
            )
        )
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    load = {
        "stable_diffusion": f"DiffusionPipeline.from_pretrained({str(target)!r})",
        "lora": f"pipe = DiffusionPipeline.from_pretrained({str(target)!r}); pipe.load_lora_weights({str(target)!r})",
        "curate": f"DiffusionPipeline.from_pretrained({str(target)!r}, trust_remote_code=True)",
    }[kind]
    return {"kind": kind, "load": load, "checkpoint": str(ckpt), "step": state["step"], "weights": weights}


def _scheduler(gen, cfg):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = DDIMScheduler if cfg.validation.sampler == "ddim" else DPMSolverMultistepScheduler
    return cls.from_config(gen.noise.config)


def _write(gen, state: dict[str, Any], tmp: Path) -> str:
    from diffusers import StableDiffusionPipeline

    from curate.train.config import TrainConfig

    cfg = TrainConfig.model_validate(state["config"])
    scheduler = _scheduler(gen, cfg)
    unet, text, vae = gen.denoiser.unet, gen.text, gen.vae
    if vae is not None and abs(float(vae.config.scaling_factor) - gen.scaling) > 0:
        vae.register_to_config(scaling_factor=gen.scaling)  # model.vae.scaling_factor overrode the VAE's
    if cfg.model.lora is not None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from curate.train.pretrained import load_pipeline_unet

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        base = load_pipeline_unet(gen.pretrained)
        _sd_pipeline(base, text, vae, scheduler).save_pretrained(tmp)
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        return "lora"
    standard = text.kind == "hf" and vae is not None and unet.config.class_embed_type is None
    if standard:
        text.tokenizer.model_max_length = _token_length(text)
        _sd_pipeline(unet, text, vae, scheduler).save_pretrained(tmp)
        return "stable_diffusion"
    if text.kind == "hf":
        encoder, tokenizer = text.model, text.tokenizer
        tokenizer.model_max_length = _token_length(text)
        context, pad = tokenizer.model_max_length, None
    else:
        encoder = open_clip_text_to_transformers(text.model)
        tokenizer = open_clip_tokenizer(text.tokenizer)
        context, pad = text.max_tokens, 0
    from curate.train.diffusers_pipeline import CurateTextToImagePipeline

    pipe = CurateTextToImagePipeline(
        unet=unet,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=vae,
        context_tokens=context,
        pad_token_id=pad,
    )
    pipe.save_pretrained(tmp)
    shutil.copyfile(Path(__file__).with_name("diffusers_pipeline.py"), tmp / PIPELINE_FILE)
    index = json.loads((tmp / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), PIPELINE_CLASS]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return "curate"


def _token_length(text) -> int:
    """The token length curate's hf text encoder pads and truncates to."""
    return min(text.max_tokens, int(text.tokenizer.model_max_length))


def _sd_pipeline(unet, text, vae, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text.model,
        tokenizer=text.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- open_clip's text tower as transformers' CLIP --------------------------------------------------------------


def open_clip_text_to_transformers(model: nn.Module):
    """An open_clip CLIP's text tower as a transformers ``CLIPTextModelWithProjection`` with the same weights:
    its ``last_hidden_state`` is open_clip's token states after ``ln_final`` and its ``text_embeds`` is
    ``encode_text`` (both up to float rounding). Raises :class:`TrainError` for towers that map to no CLIP
    text model (layer scale, extra norms, another pooling)."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    blocks = list(model.transformer.resblocks)
    first = blocks[0]
    why = []
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        why.append(f"pooling {model.text_pool_type}")
    for name in ("ls_1", "ls_2", "ln_attn"):
        if not isinstance(getattr(first, name, nn.Identity()), nn.Identity):
            why.append(name)
    if not isinstance(getattr(first.mlp, "ln", nn.Identity()), nn.Identity):
        why.append("mlp.ln")
    if getattr(model, "attn_mask", None) is None:
        why.append("no causal mask")
    if why:
        raise TrainError(f"this open_clip text tower has no transformers CLIP equivalent ({', '.join(why)})")
    proj = model.text_projection
    proj_weight = proj.weight if isinstance(proj, nn.Linear) else proj.T
    if isinstance(proj, nn.Linear) and proj.bias is not None:
        raise TrainError("this open_clip text projection has a bias; transformers' CLIP has none")
    width = model.positional_embedding.shape[1]
    config = CLIPTextConfig(
        vocab_size=model.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act="quick_gelu" if isinstance(first.mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=model.ln_final.eps,
        projection_dim=proj_weight.shape[0],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    hf = CLIPTextModelWithProjection(config)
    state = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": proj_weight,
    }
    for i, block in enumerate(blocks):
        pre = f"text_model.encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        state.update(
            {
                pre + "self_attn.q_proj.weight": q,
                pre + "self_attn.k_proj.weight": k,
                pre + "self_attn.v_proj.weight": v,
                pre + "self_attn.q_proj.bias": qb,
                pre + "self_attn.k_proj.bias": kb,
                pre + "self_attn.v_proj.bias": vb,
                pre + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                pre + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                pre + "layer_norm1.weight": block.ln_1.weight,
                pre + "layer_norm1.bias": block.ln_1.bias,
                pre + "layer_norm2.weight": block.ln_2.weight,
                pre + "layer_norm2.bias": block.ln_2.bias,
                pre + "mlp.fc1.weight": block.mlp.c_fc.weight,
                pre + "mlp.fc1.bias": block.mlp.c_fc.bias,
                pre + "mlp.fc2.weight": block.mlp.c_proj.weight,
                pre + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    hf.load_state_dict(
        {k: v.detach().clone().float().cpu().contiguous() for k, v in state.items()}, strict=True
    )
    return hf.eval()


def open_clip_tokenizer(tokenizer: Any):
    """open_clip's BPE tokenizer (``SimpleTokenizer``) as a transformers ``CLIPTokenizer`` that gives the same
    ids up to the end token: the same vocabulary and merges, the same context length (open_clip pads with id
    0 after the end token; :mod:`curate.train.diffusers_pipeline` does so from its ``pad_token_id``)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):
        raise TrainError(
            f"open_clip tokenizer {type(tokenizer).__name__}: only CLIP's BPE tokenizer converts"
        )
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in tokenizer.encoder.items()}
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    # open_clip pads with id 0 ("!"); as the pad token "!" would be matched in prompts too, the pipeline pads
    # with the id itself (its config's pad_token_id)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=int(tokenizer.context_length))
