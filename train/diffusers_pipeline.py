"""The diffusers pipeline class that ``curate export`` ships inside a folder when Stable Diffusion's pipeline
cannot run the model: curate's own models trained from scratch, which add the pooled text embedding to the
timestep embedding (``class_labels``), may work in pixel space (no VAE), and attend to the first
``context_tokens`` token states only.

The folder's ``model_index.json`` names this file (``curate_pipeline.py``) and class, so diffusers loads it
as a local custom pipeline::

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    image = pipe("a red circle", num_inference_steps=25, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]

It samples as ``curate generate`` does, step for step (the same noise for the same seed, classifier-free
guidance with the empty caption, the same pixel conversion), so the two give the same image. This file
imports nothing of curate: it runs wherever diffusers and transformers are installed.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class CurateTextToImagePipeline(DiffusionPipeline):
    """Text-to-image with a UNet2DConditionModel, a CLIP text encoder (its pooled, projected embedding as
    ``class_labels`` when the UNet has a class embedding), an optional AutoencoderKL and a scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        vae=None,
        context_tokens: int = 77,
        pad_token_id: int | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae
        )
        # pad_token_id: the id the text encoder was trained with after the end token (open_clip pads with 0,
        # which as a tokenizer's pad token would also turn every "!" of a prompt into padding)
        self.register_to_config(context_tokens=context_tokens, pad_token_id=pad_token_id)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, context_tokens, D] and the pooled embedding [B, P] (projected when the encoder
        has a projection)."""
        length = self.tokenizer.model_max_length
        rows = self.tokenizer(prompts, truncation=True, max_length=length).input_ids
        pad = self.config.pad_token_id
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id if pad is None else pad)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        ids = ids.to(device)
        out = self.text_encoder(input_ids=ids)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output
        return out.last_hidden_state.float()[:, : self.config.context_tokens], pooled.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        n = len(prompts)
        states, pooled = self.encode_prompt(prompts, device)
        null_states, null_pooled = self.encode_prompt([""], device)
        context = torch.cat([null_states.expand(n, -1, -1), states])
        pooled = torch.cat([null_pooled.expand(n, -1), pooled])
        size = self.unet.config.sample_size
        shape = (n, self.unet.config.in_channels, size, size)
        x = torch.randn(shape, generator=generator).to(device)  # on the CPU: the same noise on every device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        with_class = self.unet.config.class_embed_type is not None
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = self.scheduler.scale_model_input(torch.cat([x] * 2), t)
            eps = self.unet(
                inp,
                t,
                encoder_hidden_states=context.to(inp.dtype),
                class_labels=pooled.to(inp.dtype) if with_class else None,
            ).sample.float()
            uncond, cond = eps.split(n)
            x = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
        if self.vae is None:
            images = x.clamp(-1, 1)
        else:
            latents = (x / self.vae.config.scaling_factor).to(self.vae.dtype)
            images = self.vae.decode(latents).sample.float().clamp(-1, 1)
        pixels = ((images.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
        if output_type == "pil":
            from PIL import Image

            result = [Image.fromarray(p) for p in pixels]
        elif output_type == "np":
            result = pixels.astype(np.float32) / 255.0
        else:
            raise ValueError(f"output_type {output_type!r}: use pil or np")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
