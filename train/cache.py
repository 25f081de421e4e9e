"""Precomputed VAE latents and text embeddings (``data.cache: true``, or ``curate train --cache`` for the pass
alone): the frozen encoders run once per sample instead of once per step.

``<output>/cache/<shard name>.safetensors`` holds, for every sample of that shard that has an image and a
caption, ``<uid>/states`` and ``<uid>/pooled`` (the text encoder's output for its training caption) and, with
a VAE, ``<uid>/mean`` and ``<uid>/std`` of its latent distribution (the latent itself is drawn at every step
from these, with the step's own generator, as without the cache). Without a VAE the images stay pixels and
are decoded as usual. ``<output>/cache/cache.json`` records what the cache was made with (captions,
resolution, crop, text encoder, VAE); a cache made otherwise is rebuilt. A shard's file is written under a
temporary name and renamed, so a killed pass leaves no half file; the next pass does the rest.

A cached image has one preprocessing, so the cache needs ``data.crop: center`` and ``data.flip: false``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.base import TrainError

__all__ = ["ShardCache", "build_cache", "cache_folder"]


def cache_folder(output: str | Path) -> Path:
    return Path(output) / "cache"


def _identity(cfg, gen) -> dict[str, Any]:
    return {
        "caption": cfg.data.caption,
        "resolution": cfg.data.resolution,
        "crop": cfg.data.crop,
        "text_encoder": gen.text.name,
        "max_tokens": gen.text.max_tokens,
        "vae": None
        if gen.vae is None
        else {"model": cfg.model.model_dump(mode="json").get("vae"), "pretrained": cfg.model.pretrained},
    }


def check_cacheable(cfg) -> None:
    if cfg.data.crop != "center" or cfg.data.flip:
        raise TrainError(
            "data.cache needs data.crop: center and data.flip: false (one preprocessing per image)"
        )


@torch.no_grad()
def build_cache(cfg, gen, shards: list[str], device: Any, say=print, batch_size: int = 32) -> Path:
    """Encode every sample of ``shards`` not cached yet; returns the cache folder."""
    from curate.train.data import caption_of, iter_samples, to_pixels

    folder = cache_folder(cfg.output)
    identity = _identity(cfg, gen)
    record = folder / "cache.json"
    if record.exists() and json.loads(record.read_text()) != identity:
        say(f"the cache in {folder} was made with other settings: rebuilding it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=2, sort_keys=True))
    done = 0
    for shard in shards:
        target = folder / f"{Path(shard).name}.safetensors"
        if target.exists():
            continue
        tensors: dict[str, torch.Tensor] = {}
        batch: list[tuple[str, np.ndarray, str]] = []

        for s in iter_samples(shard):
            if s.image is None:
                continue
            pixels = np.zeros(0)
            if gen.vae is not None:
                pixels = to_pixels(
                    s.image,
                    cfg.data.resolution,
                    "center",
                    False,
                    np.random.default_rng(0),
                    f"{s.uid}.{s.ext}",
                )
            batch.append((s.uid, pixels, caption_of(s, cfg.data.caption)))
            if len(batch) == batch_size:
                _encode(gen, batch, device, tensors)
        if batch:
            _encode(gen, batch, device, tensors)
        from safetensors.torch import save_file

        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, target)
        done += 1
    say(f"cache: {done} shard(s) encoded, {len(shards) - done} already there, in {folder}")
    return folder


def _encode(
    gen, batch: list[tuple[str, np.ndarray, str]], device: Any, into: dict[str, torch.Tensor]
) -> None:
    """Encode a batch of (uid, pixels, caption) into ``into`` under ``<uid>/<name>``; empties the batch."""
    uids = [u for u, _, _ in batch]
    text = gen.text.encode([c for _, _, c in batch], device)
    out = {"states": text.states, "pooled": text.pooled}
    if gen.vae is not None:
        pixels = torch.from_numpy(np.stack([p for _, p, _ in batch])).to(device)
        dist = gen.vae.encode(pixels.to(gen.vae.dtype)).latent_dist
        out.update(mean=dist.mean, std=dist.std)
    for name, values in out.items():
        for uid, v in zip(uids, values, strict=True):
            into[f"{uid}/{name}"] = v.float().cpu().contiguous()
    batch.clear()


class ShardCache:
    """Reads a built cache: the cached tensors of a batch of samples (opened per shard, never all in memory)."""

    def __init__(self, folder: str | Path, latents: bool):
        self.folder = Path(folder)
        self.latents = latents

    def batch(self, samples: list) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        names = ["states", "pooled"] + (["mean", "std"] if self.latents else [])
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles: dict[str, Any] = {}
        for s in samples:
            shard = Path(s.shard).name
            if shard not in handles:
                path = self.folder / f"{shard}.safetensors"
                if not path.exists():
                    raise TrainError(f"{path} is missing: build the cache first (curate train --cache)")
                handles[shard] = safe_open(str(path), framework="pt")
            f = handles[shard]
            for n in names:
                try:
                    parts[n].append(f.get_tensor(f"{s.uid}/{n}"))
                except Exception as e:  # safetensors raises its own error for a missing key
                    raise TrainError(
                        f"sample {s.uid} of {shard} is not in the cache: rebuild it ({e})"
                    ) from None
        return {f"cached_{n}": torch.stack(v) for n, v in parts.items()}
