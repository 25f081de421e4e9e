"""The text-to-image model, from diffusers building blocks.

- a ``UNet2DConditionModel`` (size from the config: ``tiny`` for CPU runs up to Stable Diffusion 1.x sizes);
- a frozen text encoder whose token states are the cross-attention context: the curation's own CLIP text
  tower through open_clip (``from_run`` reads which one from the run's ``run.json``), or a transformers
  ``CLIPTextModel``;
- optionally a frozen ``AutoencoderKL`` (latent diffusion); without one the model works in pixel space;
- or all three (UNet, text encoder, VAE) and the noise schedule from a pretrained diffusers pipeline
  (``model.pretrained``, :mod:`curate.train.pretrained`), its UNet fine-tuned whole or through LoRA adapters
  (``model.lora``, peft, as diffusers' LoRA script does);
- optionally, for retrieval-augmented generation, extra cross-attention tokens of the retrieved neighbours,
  with learned null tokens for samples (and guidance passes) without neighbours: a projection of each
  neighbour's CLIP image embedding (``retrieval.condition: embedding``, as kNN-Diffusion and RDM), or each
  neighbour's image as patch tokens of a small trained encoder plus its caption's text-encoder token states
  (``images_and_captions``, as Re-Imagen and RealRAG: the model can copy what a rare concept looks like and
  read which words name it);
- a DDPM noise scheduler for training, DDIM or DPM-Solver for sampling.

Sampling with both guidances (text ``g``, retrieval ``r``)::

    eps = eps(∅, ∅) + g * (eps(text, ∅) - eps(∅, ∅)) + r * (eps(text, nbrs) - eps(text, ∅))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from curate.base import TrainError
from curate.train.config import LoraConfig, ModelConfig, TextEncoderConfig

__all__ = [
    "Denoiser",
    "Generator",
    "NeighbourTokens",
    "Neighbours",
    "RetrievalTokens",
    "Text",
    "TextEncoder",
    "add_lora",
    "build_unet",
    "clip_from_run",
    "load_frozen",
    "load_vae",
]


class Text(NamedTuple):
    """A batch of encoded captions: token states [B, L, D] (cross-attention) and the pooled embedding [B, P]
    (added to the timestep embedding, as SDXL and Imagen do: a fast path for global attributes)."""

    states: torch.Tensor
    pooled: torch.Tensor

    def where(self, drop: torch.Tensor, null: Text) -> Text:
        """This batch with the rows in ``drop`` replaced by ``null`` (a batch of one)."""
        return Text(
            torch.where(drop.view(-1, 1, 1), null.states.expand_as(self.states), self.states),
            torch.where(drop.view(-1, 1), null.pooled.expand_as(self.pooled), self.pooled),
        )

    def expand(self, n: int) -> Text:
        return Text(self.states.expand(n, -1, -1), self.pooled.expand(n, -1))


class TextEncoder:
    """A frozen text encoder: ``encode(captions)`` -> :class:`Text` (token states after the final layer norm,
    and the pooled, projected embedding: CLIP's own text embedding)."""

    def __init__(self, kind: str, model: Any, tokenizer: Any, name: str, max_tokens: int, clip: Any = None):
        self.kind, self.model, self.tokenizer, self.name = kind, model, tokenizer, name
        self.max_tokens = max_tokens
        self.clip = clip  # the curate ClipModel (open_clip kinds): CLIPScore and retrieval queries use it
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @property
    def dim(self) -> int:
        if self.kind == "hf":
            return int(self.model.config.hidden_size)
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def pooled_dim(self) -> int:
        if self.kind == "hf":
            return int(self.model.config.hidden_size)
        proj = self.model.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @classmethod
    def load(cls, cfg: TextEncoderConfig, run_clip: dict[str, str] | None, device: Any) -> TextEncoder:
        if cfg.kind == "hf":
            from transformers import AutoTokenizer, CLIPTextModel

            from curate.models.hub import resolve_model
            from curate.models.vlm import load_hf_model

            folder = resolve_model("text encoder", cfg.path or "")  # a folder, the model cache or the hub
            model, _, _ = load_hf_model(CLIPTextModel, folder, str(device), "fp32", None, False)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            return cls("hf", model, tokenizer, f"hf:{cfg.path}", cfg.max_tokens)
        from curate.models.clip import ClipModel

        if cfg.kind == "from_run":
            if not run_clip:
                raise TrainError(
                    "model.text_encoder.kind is from_run, but no data source is a curate run with clip_score: "
                    "set kind open_clip (model, pretrained) or hf (path)"
                )
            model, pretrained = run_clip["model"], run_clip.get("pretrained") or ""
        else:
            model, pretrained = cfg.model or "", cfg.pretrained
        clip = ClipModel.load(model, pretrained, device=str(device), precision="fp32")
        return cls("open_clip", clip.model, clip.tokenizer, clip.name, cfg.max_tokens, clip=clip)

    @torch.no_grad()
    def encode(self, captions: list[str], device: Any) -> Text:
        if self.kind == "hf":
            tokens = self.tokenizer(
                captions,
                padding="max_length",
                truncation=True,
                max_length=min(self.max_tokens, self.tokenizer.model_max_length),
                return_tensors="pt",
            ).input_ids.to(device)
            out = self.model(input_ids=tokens)
            return Text(out.last_hidden_state.float(), out.pooler_output.float())
        from open_clip.transformer import text_global_pool

        m = self.model
        text = self.tokenizer(captions).to(device)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        pooled = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return Text(x[:, : self.max_tokens].float(), pooled.float())


def clip_from_run(run_roots: list[str]) -> dict[str, str] | None:
    """The clip_score stage's model and pretrained of the first run that has one (as its run.json says)."""
    from curate.core.output import OutputFolder

    for root in run_roots:
        out = OutputFolder(root)
        info = out.read_run() or {}
        path = out.root
        for stage in info.get("config", {}).get("stages", []):
            if stage.get("stage") == "clip_score":
                model = str(stage.get("model", "ViT-L-14"))
                if model.startswith("local-dir:") and "://" not in root:
                    folder = Path(model[len("local-dir:") :])
                    if not folder.is_absolute() and not folder.is_dir():
                        # relative to where that run was started: some folder above the run's output
                        above = [p / folder for p in Path(path).resolve().parents if (p / folder).is_dir()]
                        folder = above[0] if above else folder
                    model = f"local-dir:{folder.resolve()}"
                return {"model": model, "pretrained": str(stage.get("pretrained") or "")}
    return None


def build_unet(cfg: ModelConfig, in_channels: int, sample_size: int, cross_dim: int, pooled_dim: int | None):
    from diffusers import UNet2DConditionModel

    kwargs = cfg.unet.resolved()
    if pooled_dim:
        kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        cross_attention_dim=cross_dim,
        **kwargs,
    )


class RetrievalTokens(nn.Module):
    """Neighbours' CLIP image embeddings [B, k, d] -> k cross-attention tokens [B, k, D]; ``null`` tokens
    stand for "no neighbours" (retrieval dropout in training, the unconditional guidance pass)."""

    def __init__(self, clip_dim: int, cross_dim: int, k: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, cross_dim), nn.GELU(), nn.Linear(cross_dim, cross_dim))
        self.rank = nn.Parameter(torch.zeros(k, cross_dim))  # the neighbour's rank, 0 = nearest
        self.null = nn.Parameter(torch.randn(k, cross_dim) * 0.02)
        self.k = k

    def forward(
        self, neighbours: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        null = self.null.unsqueeze(0).expand(batch, -1, -1)
        if neighbours is None:
            return null
        tokens = self.proj(neighbours.to(self.null.dtype)) + self.rank
        if drop is None:
            return tokens
        return torch.where(drop.view(-1, 1, 1), null, tokens)


class Neighbours(NamedTuple):
    """A batch's neighbours for ``images_and_captions``: images [B, k, 3, s, s] in [-1, 1] and their captions'
    token states [B, k, L, D] (the frozen text encoder's)."""

    images: torch.Tensor
    captions: torch.Tensor

    def rows(self, start: int, stop: int) -> Neighbours:
        return Neighbours(self.images[start:stop], self.captions[start:stop])

    def to(self, device: Any) -> Neighbours:
        return Neighbours(self.images.to(device), self.captions.to(device))


class NeighbourTokens(nn.Module):
    """:class:`Neighbours` -> cross-attention tokens [B, k * (P + L), D]: per neighbour, P patch tokens of its
    image (a small conv encoder, learned positions) and L tokens of its caption (a projection of the text
    encoder's states), plus a learned rank embedding; ``null`` tokens stand for "no neighbours"."""

    def __init__(
        self, text_dim: int, cross_dim: int, k: int, image_size: int, patch: int, caption_tokens: int
    ):
        super().__init__()
        self.k, self.caption_tokens = k, caption_tokens
        patches = (image_size // patch) ** 2
        self.image = nn.Sequential(
            nn.Conv2d(3, cross_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(cross_dim, cross_dim, patch, stride=patch),
        )
        self.position = nn.Parameter(torch.randn(patches, cross_dim) * 0.02)
        self.caption = nn.Linear(text_dim, cross_dim)
        self.rank = nn.Parameter(torch.zeros(k, 1, cross_dim))  # the neighbour's rank, 0 = nearest
        self.null = nn.Parameter(torch.randn(k * (patches + caption_tokens), cross_dim) * 0.02)

    def forward(
        self, neighbours: Neighbours | None, batch: int, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        null = self.null.unsqueeze(0).expand(batch, -1, -1)
        if neighbours is None:
            return null
        images = neighbours.images.to(self.null.dtype)
        b, k = images.shape[:2]
        patches = self.image(images.flatten(0, 1)).flatten(2).transpose(1, 2) + self.position
        words = self.caption(
            neighbours.captions[:, :, : self.caption_tokens].flatten(0, 1).to(self.null.dtype)
        )
        tokens = (torch.cat([patches, words], dim=1).view(b, k, -1, null.shape[-1]) + self.rank).flatten(1, 2)
        if drop is None:
            return tokens
        return torch.where(drop.view(-1, 1, 1), null, tokens)


class Denoiser(nn.Module):
    """What is trained: the UNet and the retrieval tokens. ``forward`` assembles the cross-attention context
    (text tokens, the empty caption's where ``drop_text``; then k retrieval tokens, null where ``drop_rag``
    or without neighbours) and predicts the noise (or v)."""

    def __init__(self, unet: nn.Module, retrieval: RetrievalTokens | NeighbourTokens | None):
        super().__init__()
        self.unet = unet
        self.retrieval = retrieval

    def context(self, text: Text, neighbours=None, drop_rag=None) -> torch.Tensor:
        if self.retrieval is None:
            return text.states
        return torch.cat([text.states, self.retrieval(neighbours, text.states.shape[0], drop_rag)], dim=1)

    def predict(self, x, t, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled.to(x.dtype) if self.unet.config.class_embed_type else None
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype), class_labels=pooled).sample

    def forward(self, x, t, text: Text, null: Text, neighbours=None, drop_text=None, drop_rag=None):
        if drop_text is not None:
            text = text.where(drop_text, null)
        return self.predict(x, t, self.context(text, neighbours, drop_rag), text.pooled)


class Generator:
    """The denoiser plus the frozen parts (text encoder, VAE) and the schedulers. With ``pretrained`` (a
    pipeline folder) the UNet and the noise schedule are that pipeline's."""

    def __init__(
        self,
        cfg: ModelConfig,
        resolution: int,
        text: TextEncoder,
        vae: Any | None,
        clip_dim: int | None,
        pretrained: Path | None = None,
    ):
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.text = text
        self.vae = vae
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.latent_size = resolution // factor
            self.channels = int(vae.config.latent_channels)
            sf = cfg.vae.scaling_factor if cfg.vae and cfg.vae.scaling_factor else vae.config.scaling_factor
            self.scaling = float(sf)
        else:
            self.latent_size, self.channels, self.scaling = resolution, 3, 1.0
        self.resolution = resolution
        self.clip_dim = clip_dim
        r = cfg.retrieval
        retrieval: RetrievalTokens | NeighbourTokens | None = None
        if r is not None and r.condition == "images_and_captions":
            tokens = min(r.caption_tokens, text.max_tokens)
            retrieval = NeighbourTokens(text.dim, text.dim, r.k, r.image_size, r.patch, tokens)
        elif r is not None and clip_dim:
            retrieval = RetrievalTokens(clip_dim, text.dim, r.k)
        self.pretrained = pretrained
        if pretrained is not None:
            from curate.train.pretrained import load_noise_schedule, load_pipeline_unet

            unet = load_pipeline_unet(pretrained)
            self.noise = load_noise_schedule(pretrained)
            if unet.config.cross_attention_dim != text.dim or unet.config.in_channels != self.channels:
                raise TrainError(
                    f"{pretrained}: its UNet (cross-attention {unet.config.cross_attention_dim}, "
                    f"{unet.config.in_channels} channels) does not fit its text encoder ({text.dim}) and VAE "
                    f"({self.channels} latent channels)"
                )
        else:
            pooled = text.pooled_dim if cfg.pooled_text else None
            unet = build_unet(cfg, self.channels, self.latent_size, text.dim, pooled)
            self.noise = DDPMScheduler(
                num_train_timesteps=cfg.train_timesteps,
                beta_schedule=cfg.beta_schedule,
                prediction_type=cfg.prediction,
                clip_sample=vae is None,
            )
        self.prediction: str = self.noise.config.prediction_type
        if cfg.lora is not None:
            add_lora(unet, cfg.lora)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.attention == "xformers":
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise TrainError("model.attention xformers needs the xformers package: pip install xformers")
            unet.enable_xformers_memory_efficient_attention()
        self.denoiser = Denoiser(unet, retrieval)
        self._null_text: Text | None = None

    def null_text(self, device: Any) -> Text:
        """The empty caption, encoded: what classifier-free guidance drops the text to."""
        if self._null_text is None or self._null_text.states.device != torch.device(device):
            self._null_text = self.text.encode([""], device)
        return self._null_text

    @torch.no_grad()
    def encode_neighbours(self, images: torch.Tensor, captions: list[list[str]], device: Any) -> Neighbours:
        """Neighbours' images (uint8 [B, k, s, s, 3]) and captions -> :class:`Neighbours` on ``device``, the
        captions through the frozen text encoder (each distinct caption once)."""
        pixels = images.to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
        b, k = pixels.shape[:2]
        flat = [c for row in captions for c in row]
        distinct = {c: i for i, c in enumerate(dict.fromkeys(flat))}
        states = self.text.encode(list(distinct), device).states
        tokens = self.denoiser.retrieval.caption_tokens
        where = torch.tensor([distinct[c] for c in flat], device=states.device)
        states = states[where, :tokens]
        return Neighbours(pixels, states.reshape(b, k, tokens, -1))

    # -- pixels <-> model space --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[-1, 1] pixels -> what the UNet denoises (VAE latents times the scaling factor, or the pixels)."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return (dist.sample(generator=generator) * self.scaling).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.clamp(-1, 1)
        return self.vae.decode((x / self.scaling).to(self.vae.dtype)).sample.float().clamp(-1, 1)

    # -- sampling ------------------------------------------------------------------------------------------------

    def sampler(self, kind: str):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        cls = DDIMScheduler if kind == "ddim" else DPMSolverMultistepScheduler
        return cls.from_config(self.noise.config)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        denoiser: Denoiser | None = None,
        neighbours: torch.Tensor | None = None,
        guidance: float = 3.0,
        rag_guidance: float = 1.0,
        steps: int = 25,
        sampler: str = "ddim",
        seed: int = 0,
        device: Any = "cpu",
        batch: int = 64,
    ) -> np.ndarray:
        """Images for the prompts: uint8 [n, H, W, 3]. ``denoiser`` defaults to the live one (pass the EMA
        copy to sample from that); ``neighbours`` ([n, k, d] embeddings, or :class:`Neighbours`) turns on
        retrieval guidance."""
        denoiser = denoiser or self.denoiser
        out = []
        for start in range(0, len(prompts), batch):
            part = prompts[start : start + batch]
            nb = None
            if isinstance(neighbours, Neighbours):
                nb = neighbours.rows(start, start + batch).to(device)
            elif neighbours is not None:
                nb = neighbours[start : start + batch].to(device)
            gen = torch.Generator().manual_seed(seed + start)
            shape = (len(part), self.channels, self.latent_size, self.latent_size)
            x = torch.randn(shape, generator=gen).to(device)
            out.append(self._denoise(x, part, denoiser, nb, guidance, rag_guidance, steps, sampler, device))
        images = torch.cat(out) if out else torch.zeros(0, 3, self.resolution, self.resolution)
        return ((images.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)

    def _denoise(self, x, prompts, denoiser, nb, guidance, rag_guidance, steps, sampler, device):
        n = len(prompts)
        text = self.text.encode(prompts, device)
        null = self.null_text(device).expand(n)
        contexts = [denoiser.context(null), denoiser.context(text)]
        pooled = [null.pooled, text.pooled]
        if nb is not None and denoiser.retrieval is not None:
            contexts.append(denoiser.context(text, nb))
            pooled.append(text.pooled)
        ctx, pooled_all = torch.cat(contexts), torch.cat(pooled)
        scheduler = self.sampler(sampler)
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        passes = len(contexts)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x] * passes), t)
            eps = denoiser.predict(inp, t, ctx, pooled_all).float()
            parts = eps.split(n)
            pred = parts[0] + guidance * (parts[1] - parts[0])
            if passes == 3:
                pred = pred + rag_guidance * (parts[2] - parts[1])
            x = scheduler.step(pred, t, x).prev_sample
        return self.decode(x).cpu()


def add_lora(unet: Any, lora: LoraConfig) -> None:
    """Freeze the UNet and give it LoRA adapters (peft), initialised as diffusers' LoRA script does."""
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha or lora.rank,
            init_lora_weights="gaussian",
            target_modules=list(lora.target_modules),
        )
    )


def load_frozen(cfg: ModelConfig, run_clip: dict[str, str] | None, device: Any):
    """The frozen parts: ``(text encoder, VAE or None, pretrained pipeline folder or None)``."""
    if cfg.pretrained:
        from curate.train.pretrained import load_pipeline_text, load_pipeline_vae, pipeline_folder

        folder = pipeline_folder(cfg.pretrained)
        model, tokenizer = load_pipeline_text(folder, device)
        length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        text = TextEncoder("hf", model, tokenizer, f"pretrained:{cfg.pretrained}", length)
        return text, load_pipeline_vae(folder, device), folder
    return TextEncoder.load(cfg.text_encoder, run_clip, device), load_vae(cfg, device), None


def load_vae(cfg: ModelConfig, device: Any):
    if cfg.vae is None:
        return None
    from diffusers import AutoencoderKL

    from curate.train.pretrained import vae_folder

    kwargs = {"subfolder": cfg.vae.subfolder} if cfg.vae.subfolder else {}
    folder = vae_folder(cfg.vae.path, cfg.vae.subfolder)  # a hub id: from the model directory (models fetch)
    vae = AutoencoderKL.from_pretrained(str(folder), **kwargs).to(device)
    vae.requires_grad_(False)
    vae.eval()
    return vae
