"""The trainer's typed config: ``curate train TRAIN.yaml [--set key=value ...]``.

One YAML file with six sections (see ``pipelines/train_demo.yaml``)::

    name: demo
    output: demo-output/train/curated    # checkpoints/, logs/ (TensorBoard), samples/, validation.jsonl
    data: {shards: [demo-output/run], caption: txt, rules: ["clip_score >= 0.3"], resolution: 32}
    model: {unet: {preset: tiny}, text_encoder: {kind: from_run}, vae: null}
    optim: {lr: 1e-3, batch_size: 32, warmup_steps: 50, ema_decay: 0.999, cfg_dropout: 0.1}
    schedule: {steps: 1000}
    checkpoint: {every: 500}
    validation: {every: 500, prompts: [...], fid_samples: 64}

Unknown keys are errors, and every problem names its YAML path, as in pipeline configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from curate.base import ConfigError, StrictModel
from curate.core.config import _interpolate, _pydantic_problems, apply_overrides
from curate.kit.rules import parse_rule

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RetrievalConfig",
    "ScheduleConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "UNetConfig",
    "VAEConfig",
    "ValidationConfig",
    "load_train_config",
    "parse_train_config",
]

CaptionChoice = Literal["txt", "alt", "vlm", "fused"]


class DataConfig(StrictModel):
    shards: list[str] = Field(
        min_length=1,
        description="run output folders (their shards/), shard folders, .tar files or globs; local or fsspec",
    )
    caption: CaptionChoice = Field(
        "txt",
        description="txt: the shard's <uid>.txt (the run's train_caption); alt: the json caption; "
        "vlm: caption_vlm; fused: caption_fused (a sample without the chosen caption falls back to txt)",
    )
    rules: list[str] = Field(
        default_factory=list,
        description="load-time filters on each sample's json, as in the filter stage: 'clip_score >= 0.3'",
    )
    missing: Literal["drop", "keep"] = Field("drop", description="what a rule does with a missing value")
    min_size: int = Field(0, ge=0, description="drop images whose shorter side is below this")
    resolution: int = Field(32, ge=8, description="training images are resize+crop to this square")
    crop: Literal["center", "random"] = "center"
    flip: bool = Field(False, description="random horizontal flips (off for text that names sides)")
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(0, ge=0, description="DataLoader workers per rank")
    cache: bool = Field(
        False,
        description="encode captions (and, with a VAE, images) once into <output>/cache and train from that "
        "(needs crop: center, flip: false)",
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of samples (by uid hash) kept out of training: the FID/KID reference set",
    )

    @model_validator(mode="after")
    def _cacheable(self) -> DataConfig:
        if self.cache and (self.crop != "center" or self.flip):
            raise ValueError("cache needs crop: center and flip: false: a cached image has one preprocessing")
        return self

    @field_validator("rules")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        for r in rules:
            parse_rule(r)  # a ValueError names the rule and the syntax
        return rules


class UNetConfig(StrictModel):
    preset: Literal["tiny", "small", "sd"] | None = Field(
        "tiny", description="tiny: ~1 M parameters for CPU runs; small: ~20 M; sd: Stable Diffusion 1.x sizes"
    )
    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    attention_head_dim: int | None = None
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None
    norm_num_groups: int | None = None
    transformer_layers_per_block: int | None = None

    @model_validator(mode="after")
    def _complete(self) -> UNetConfig:
        self.resolved()  # a ValueError says what is missing
        return self

    def resolved(self) -> dict[str, Any]:
        """The UNet2DConditionModel keyword arguments this config asks for (preset, then overrides)."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": {  # attention only at the lowest resolution: a fast step on a CPU
                "block_out_channels": [32, 64, 64],
                "layers_per_block": 1,
                "attention_head_dim": 8,
                "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
                "norm_num_groups": 8,
            },
            "small": {
                "block_out_channels": [64, 128, 256, 256],
                "layers_per_block": 2,
                "attention_head_dim": 8,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "norm_num_groups": 32,
            },
            "sd": {  # Stable Diffusion 1.x
                "block_out_channels": [320, 640, 1280, 1280],
                "layers_per_block": 2,
                "attention_head_dim": 8,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "norm_num_groups": 32,
            },
        }
        out = dict(presets[self.preset]) if self.preset else {}
        for key in (
            "block_out_channels",
            "layers_per_block",
            "attention_head_dim",
            "down_block_types",
            "up_block_types",
            "norm_num_groups",
            "transformer_layers_per_block",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        missing = [k for k in ("block_out_channels", "down_block_types", "up_block_types") if k not in out]
        if missing:
            raise ValueError(f"without a preset, set {', '.join(missing)}")
        n = len(out["block_out_channels"])
        if len(out["down_block_types"]) != n or len(out["up_block_types"]) != n:
            raise ValueError(
                f"block_out_channels has {n} entries; down_block_types and up_block_types need as many"
            )
        return out


class TextEncoderConfig(StrictModel):
    kind: Literal["from_run", "open_clip", "hf"] = Field(
        "from_run",
        description="from_run: the CLIP that scored the first data source (its run.json); open_clip: "
        "model + pretrained; hf: a transformers CLIPTextModel folder or hub id in path",
    )
    model: str | None = Field(None, description="open_clip architecture, or local-dir:<folder>")
    pretrained: str = ""
    path: str | None = Field(None, description="hf: a CLIPTextModel + tokenizer folder or hub id")
    max_tokens: int = Field(77, ge=1, description="cross-attention over the first this many token states")

    @model_validator(mode="after")
    def _complete(self) -> TextEncoderConfig:
        if self.kind == "open_clip" and not self.model:
            raise ValueError("kind open_clip needs model (an open_clip name or local-dir:<folder>)")
        if self.kind == "hf" and not self.path:
            raise ValueError("kind hf needs path (a CLIPTextModel folder or hub id)")
        return self


class VAEConfig(StrictModel):
    path: str = Field(description="an AutoencoderKL folder or hub id (diffusers from_pretrained)")
    subfolder: str | None = None
    scaling_factor: float | None = Field(None, description="default: the VAE config's scaling_factor")


class RetrievalConfig(StrictModel):
    index: str = Field(description="a curate index folder (curate index build)")
    k: int = Field(4, ge=1, le=64)
    exclude_similarity: float = Field(
        0.97, description="neighbours this similar to the sample count as its duplicates and are skipped"
    )
    condition: Literal["embedding", "images_and_captions"] = Field(
        "embedding",
        description="embedding: each neighbour's CLIP image embedding is one cross-attention token (kNN-Diffusion, "
        "RDM); images_and_captions: its image's patch tokens (a small trained encoder of the image at image_size) "
        "and its caption's text-encoder token states (Re-Imagen, RealRAG)",
    )
    image_size: int = Field(
        16, ge=4, description="images_and_captions: the side neighbours' images are resized to"
    )
    patch: int = Field(
        4, ge=1, description="images_and_captions: patch side; (image_size / patch)^2 image tokens"
    )
    caption_tokens: int = Field(
        16, ge=1, description="images_and_captions: the first token states of each neighbour's caption"
    )

    @model_validator(mode="after")
    def _patches(self) -> RetrievalConfig:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        return self


class LoraConfig(StrictModel):
    rank: int = Field(4, ge=1, description="the LoRA matrices' rank")
    alpha: float | None = Field(None, gt=0, description="the scale is alpha / rank; default: alpha = rank")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        min_length=1,
        description="the UNet's modules that get adapters (diffusers' LoRA script: its attention projections)",
    )


# What a pretrained pipeline decides: setting any of these beside model.pretrained is an error.
PIPELINE_DECIDES = (
    "unet",
    "text_encoder",
    "vae",
    "prediction",
    "pooled_text",
    "train_timesteps",
    "beta_schedule",
)


class ModelConfig(StrictModel):
    pretrained: str | None = Field(
        None,
        description="a diffusers Stable Diffusion 1.x/2.x pipeline folder or hub id: fine-tune its UNet with "
        "its text encoder, VAE and noise schedule (prediction type from its scheduler config)",
    )
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters of the pretrained UNet (peft) instead of all its weights"
    )
    gradient_checkpointing: bool = Field(False, description="recompute the UNet's activations in backward")
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="sdpa: torch's scaled_dot_product_attention (diffusers' default); xformers"
    )
    unet: UNetConfig = Field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    vae: VAEConfig | None = Field(None, description="latent diffusion through this VAE; none: pixel space")
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    pooled_text: bool = Field(
        True, description="also add the pooled text embedding to the timestep embedding (as SDXL does)"
    )
    train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    retrieval: RetrievalConfig | None = None

    @model_validator(mode="after")
    def _pretrained(self) -> ModelConfig:
        if self.pretrained:
            fields = type(self).model_fields
            clash = [
                k
                for k in PIPELINE_DECIDES
                if getattr(self, k) != fields[k].get_default(call_default_factory=True)
            ]
            if clash:
                raise ValueError(
                    f"{', '.join(clash)}: the pretrained pipeline decides {'these' if len(clash) > 1 else 'this'}"
                    " (its unet/, text_encoder/, vae/ and scheduler/); leave them out beside pretrained"
                )
        elif self.lora is not None:
            raise ValueError("lora adapts a pretrained UNet: set model.pretrained too")
        return self


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after the warm-up")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1, description="per rank, per micro-step")
    grad_accum: int = Field(1, ge=1)
    clip_grad: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.999, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast: auto is bf16 on CUDA, fp32 on the CPU; fp16 (with a gradient scaler) needs CUDA",
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW (the gpu extra)"
    )
    snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR loss weighting (Hang et al. 2023): min(SNR, gamma); none: plain MSE"
    )
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="share of samples trained without their text")
    rag_dropout: float = Field(0.1, ge=0, le=1, description="share trained without their neighbours")


class ScheduleConfig(StrictModel):
    steps: int = Field(1000, ge=1, description="optimiser steps")
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")


class CheckpointConfig(StrictModel):
    every: int = Field(500, ge=1)
    keep: int = Field(2, ge=1, description="older checkpoints are deleted")


class ValidationConfig(StrictModel):
    every: int | None = Field(500, ge=1, description="none: only at the end")
    prompts: list[str] = Field(default_factory=list, description="fixed prompts of the sample grid")
    sampler: Literal["ddim", "dpm"] = "ddim"
    sample_steps: int = Field(25, ge=1)
    guidance: float = Field(3.0, ge=0)
    rag_guidance: float = Field(1.0, ge=0)
    seed: int = 0
    clip_score: bool = True
    fid_samples: int = Field(0, ge=0, description="held-out images for FID/KID; 0 skips them")
    feature_extractor: Literal["auto", "inception", "clip", "torchvision_inception"] = Field(
        "auto",
        description="inception: the FID Inception (pytorch-fid's network and weights file); clip: the "
        "curation's CLIP image tower; torchvision_inception: torchvision's Inception-v3 state dict; auto: "
        "inception when inception_weights is a file, else clip",
    )
    inception_weights: str | None = Field(
        None, description="a local weights file: pt_inception-2015-12-05-6726825d.pth for inception"
    )
    adherence: bool = Field(False, description="the sample world's exact prompt-adherence score")
    vqa_model: str | None = Field(
        None,
        description="VQAScore of the generated images for their prompts with this vision-language model (a hub "
        "id resolved through the model directory, or a local folder; curate.models.vqa): vqa_score",
    )
    eval_prompts: list[str] = Field(
        default_factory=list,
        description="prompts for CLIPScore, adherence and VQAScore; empty: the captions of held-out samples",
    )
    eval_samples: int = Field(64, ge=0, description="images generated for CLIPScore, adherence and VQAScore")


class TrainConfig(StrictModel):
    name: str = "train"
    output: str
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: Literal["tensorboard", "wandb"] = Field(
        "tensorboard",
        description="tensorboard: <output>/logs; wandb: Weights & Biases too, the same scalars and sample "
        "grids (project: wandb_project, else name; WANDB_MODE=offline works without a network)",
    )
    wandb_project: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.validation.fid_samples and self.data.holdout == 0:
            raise ValueError("validation.fid_samples needs data.holdout > 0: the held-out reference images")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_train_config(
    raw: Any, overrides: list[str] | None = None, source: str | None = None
) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping (output:, data:, model: ...)", source, "training")
    raw = apply_overrides(raw, overrides or [], source)
    raw = _interpolate(raw, "", source)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_pydantic_problems(e, "", TrainConfig), source, "training") from None


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror or e}", what="training") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source, "training") from None
    return parse_train_config(raw, overrides, source)
